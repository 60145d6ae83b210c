"""§3.2 palette: exact lookup, k-means, encode/decode, palette files, the preview command."""
import json

import numpy as np
import pytest

from minigpt_img import palette_kernels
from minigpt_img.palette import Palette, fit_palette, load_palette, palette_grid, to_unit


def random_palette(k, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, (k, 3))


@pytest.mark.parametrize("k", [1, 2, 7, 512])
@pytest.mark.parametrize("n", [1, 3, 1001])
def test_lookup_matches_brute_force(k, n):
    rng = np.random.default_rng(k * n)
    centers = random_palette(k, seed=k)
    pixels = rng.integers(0, 256, (n, 3), dtype=np.uint8)
    tokens, dist = Palette(centers).nearest(pixels)
    ref_tokens, ref_dist = palette_kernels.palette_lookup_ref(pixels, centers.astype(np.float32).astype(np.float64))
    np.testing.assert_array_equal(tokens, ref_tokens)
    np.testing.assert_array_equal(dist, ref_dist)


def test_lookup_ties_pick_the_lowest_index():
    c = to_unit(np.array([[10, 20, 30], [200, 100, 0], [10, 20, 30], [200, 100, 0]]))  # duplicates
    pixels = np.array([[10, 20, 30], [200, 100, 0], [105, 60, 15], [0, 0, 0]], np.uint8)
    tokens, _ = Palette(c).nearest(pixels)
    ref, _ = palette_kernels.palette_lookup_ref(pixels, c.astype(np.float32).astype(np.float64))
    np.testing.assert_array_equal(tokens, ref)
    assert tokens[0] == 0 and tokens[1] == 1


def test_lookup_adversarial_equidistant_and_cell_boundaries():
    """Centres placed exactly halfway between 8-bit levels, on grid-cell edges and at the cube's
    corners, where pruning mistakes would show."""
    levels = np.array([0, 15, 16, 17, 127, 128, 239, 240, 255])
    centers = to_unit(np.stack(np.meshgrid(levels, levels[::2], levels[::3], indexing="ij"), -1)
                      .reshape(-1, 3) + 0.5)
    centers = np.clip(centers, -1, 1)
    grid = np.stack(np.meshgrid(*[np.arange(0, 256, 5)] * 3, indexing="ij"), -1).reshape(-1, 3)
    pixels = np.concatenate([grid, np.array([[l, l, l] for l in levels])]).astype(np.uint8)
    p = Palette(centers)
    c = p.centers.astype(np.float64)
    ref, _ = palette_kernels.palette_lookup_ref(pixels, c)
    np.testing.assert_array_equal(p.nearest(pixels)[0], ref)


def test_table_equals_direct_lookup():
    p = Palette(random_palette(37, seed=3))
    table = p.table()
    codes = np.random.default_rng(0).integers(0, 1 << 24, 50_000)
    pixels = np.stack([codes >> 16, (codes >> 8) & 255, codes & 255], 1).astype(np.uint8)
    np.testing.assert_array_equal(table[codes], p.nearest(pixels)[0])
    images = pixels[:49_152].reshape(48, 32, 32, 3)
    np.testing.assert_array_equal(palette_kernels.palette_encode_table(pixels, table), p.nearest(pixels)[0])
    assert p.encode(images).shape == (48, 1024)  # the table path, now that the table exists


def test_grid_candidates_cover_every_winner():
    """For colours all over the RGB cube (every cell's eight corners and 200,000 random ones), the
    brute-force nearest centre is among the candidates of the colour's cell."""
    from minigpt_img.palette import GRID_LEVELS, GRID_SHIFT
    centers = random_palette(64, seed=5)
    start, items = palette_grid(centers)
    assert start[-1] == len(items) and np.all(np.diff(start) >= 1)
    assert np.diff(start).mean() < 64  # pruning works
    listed = np.zeros((GRID_LEVELS ** 3, len(centers)), bool)     # listed[cell, k]: k is a candidate
    listed[np.repeat(np.arange(GRID_LEVELS ** 3), np.diff(start)), items] = True
    side = 1 << GRID_SHIFT
    lo = np.arange(GRID_LEVELS) * side
    corner_values = np.stack([lo, lo + side - 1], 1)                 # (levels, 2)
    cells = np.stack(np.meshgrid(*[np.arange(GRID_LEVELS)] * 3, indexing="ij"), -1).reshape(-1, 3)
    corners = np.stack([corner_values[cells[:, c], (bits >> c) & 1] for bits in range(8) for c in range(3)],
                       1).reshape(-1, 8, 3).reshape(-1, 3)
    random = np.random.default_rng(1).integers(0, 256, (200_000, 3))
    pixels = np.concatenate([corners, random]).astype(np.uint8)
    winners, _ = palette_kernels.palette_lookup_ref(pixels, centers.astype(np.float64))
    p = pixels.astype(np.int64) >> GRID_SHIFT
    cell = (p[:, 0] * GRID_LEVELS + p[:, 1]) * GRID_LEVELS + p[:, 2]
    assert listed[cell, winners].all()


def test_encode_decode_round_trip_on_palette_colours():
    rng = np.random.default_rng(0)
    colours = rng.choice(256 ** 3, 100, replace=False)
    rgb = np.stack([colours >> 16, (colours >> 8) & 255, colours & 255], 1)
    p = Palette(to_unit(rgb))
    tokens = rng.integers(0, 100, (3, 16))
    images = p.decode(tokens)
    assert images.shape == (3, 4, 4, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(p.encode(images), tokens)
    with pytest.raises(ValueError, match="square"):
        p.decode(tokens[:, :15])


def test_kmeans_never_increases_inertia_and_is_deterministic():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (20, 16, 16, 3), dtype=np.uint8)
    images[:10] //= 32  # clumps, so clusters move
    history = []
    a = fit_palette(images, k=16, seed=3, history=history)
    assert len(history) >= 2
    assert all(later <= earlier * (1 + 1e-12) for earlier, later in zip(history, history[1:]))
    np.testing.assert_array_equal(a, fit_palette(images, k=16, seed=3))
    assert a.dtype == np.float32 and a.shape == (16, 3) and np.abs(a).max() <= 1


def test_kmeans_leaves_no_dead_cluster():
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)  # 256 pixels, ~256 colours
    centers = fit_palette(images, k=40, seed=0)
    tokens = Palette(centers).encode(images)
    assert len(np.unique(tokens)) == 40  # every centre owns some colour


def test_kmeans_with_fewer_colours_than_k():
    images = np.zeros((2, 4, 4, 3), np.uint8)
    images[0] = 255
    centers = fit_palette(images, k=5, seed=0)
    assert centers.shape == (2, 3)  # one centre per colour, no copies the data never uses
    assert set(map(tuple, Palette(centers).decode(Palette(centers).encode(images)).reshape(-1, 3))) \
        == {(0, 0, 0), (255, 255, 255)}


def test_load_palette_files(tmp_path):
    clusters = random_palette(512).round(4)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"clusters": clusters.tolist()}))
    np.testing.assert_allclose(load_palette(tmp_path / "preprocessor_config.json"), clusters, rtol=1e-6)
    np.save(tmp_path / "p.npy", clusters[:8])
    assert load_palette(tmp_path / "p.npy").shape == (8, 3)
    np.save(tmp_path / "bad.npy", np.zeros((4, 2)))
    with pytest.raises(ValueError, match=r"\(k, 3\)"):
        load_palette(tmp_path / "bad.npy")
    with pytest.raises(ValueError, match="missing.npy is not a regular file"):
        load_palette(tmp_path / "missing.npy")


def test_preview_command_writes_a_png(tmp_path, capsys):
    from PIL import Image
    folder = tmp_path / "imgs"
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (folder / cls).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / cls / f"{i}.png")
    out = tmp_path / "preview.png"
    from helpers import load_script
    sample = load_script("sample")
    assert sample.main(["--palette-preview", str(out), "--data", str(folder), "--palette-size", "8", "--n", "2"]) == 0
    assert Image.open(out).size[0] > 16 and "wrote" in capsys.readouterr().out
    assert sample.main(["--palette-preview", str(out), "--data", str(tmp_path / "nope")]) == 2
    assert "unknown dataset" in capsys.readouterr().err

