"""§3.1 data: every loader on small fixtures written in the official formats, bad input, the split,
resolution, augmentation, the token cache, downloads (file:// and a local server), and shapes."""
import hashlib
import http.server
import tarfile
import threading

import numpy as np
import pytest
from PIL import Image

from minigpt_img.data import (DataError, Split, augment, cached_tokens, load_dataset, random_resized_crops,
                              resize, split_train_val)
from minigpt_img.download import download
from minigpt_img.palette import Palette
from minigpt_img.shapes import make_shapes
from minigpt_img.streaks import (DARK as STREAK_DARK, LIGHT as STREAK_LIGHT, OFFSETS, STAY,
                                 class_log_likelihoods, judge_samples, make_streaks)

from helpers import cifar_bytes, write_cifar10  # noqa: E402

RNG = np.random.default_rng(0)


def test_cifar10_folder(tmp_path):
    folder, images, labels = write_cifar10(tmp_path)
    ds = load_dataset("cifar10", tmp_path, seed=0, official=False)
    assert ds.classes == [f"c{i}" for i in range(10)] and ds.res == 32
    assert len(ds.train) == 18 and len(ds.val) == 2 and len(ds.test) == 3
    both = np.concatenate([ds.train.images, ds.val.images])
    order = np.lexsort(both.reshape(20, -1).T)
    np.testing.assert_array_equal(both[order], images[np.lexsort(images.reshape(20, -1).T)])
    i = int(np.flatnonzero((images == ds.train.images[0]).all(axis=(1, 2, 3)))[0])
    assert ds.train.labels[0] == labels[i]  # labels stay with their images


def test_cifar10_without_test_batch_and_from_tar_gz(tmp_path):
    folder, images, _ = write_cifar10(tmp_path / "src", test=False)
    (tmp_path / "dl").mkdir()
    with tarfile.open(tmp_path / "dl" / "cifar-10-binary.tar.gz", "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-bin")
    ds = load_dataset("cifar10", tmp_path / "dl", official=False)
    assert ds.test is None and len(ds.train) + len(ds.val) == 20
    direct = load_dataset("cifar10", tmp_path / "src", official=False)
    np.testing.assert_array_equal(ds.train.images, direct.train.images)


def test_cifar100_uses_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-binary"
    folder.mkdir()
    im = RNG.integers(0, 256, (10, 32, 32, 3), dtype=np.uint8)
    fine, coarse = np.arange(10) * 9, np.arange(10) % 20
    (folder / "train.bin").write_bytes(cifar_bytes(im, fine, coarse))
    ds = load_dataset("cifar100", tmp_path, val_fraction=0.0, official=False)
    assert len(ds.classes) == 100 and ds.test is None
    assert sorted(ds.train.labels) == sorted(fine)


def test_stl10_column_major(tmp_path):
    folder = tmp_path / "stl10_binary"
    folder.mkdir()
    im = RNG.integers(0, 256, (5, 96, 96, 3), dtype=np.uint8)
    im[:, 0, :, :] = 0    # top row black: catches a transposed reading
    (folder / "train_X.bin").write_bytes(im.transpose(0, 3, 2, 1).tobytes())  # (N, C, W, H) order
    (folder / "train_y.bin").write_bytes(np.array([1, 2, 3, 10, 1], np.uint8).tobytes())
    (folder / "class_names.txt").write_text("\n".join(f"s{i}" for i in range(10)))
    ds = load_dataset("stl10", tmp_path, val_fraction=0.0, res=48, official=False)
    assert ds.res == 48 and ds.classes[9] == "s9" and ds.test is None
    full = load_dataset("stl10", tmp_path, val_fraction=0.0, official=False)
    assert np.all(full.train.images[:, 0] == 0) and not np.all(full.train.images[:, :, 0] == 0)
    assert sorted(full.train.labels.tolist()) == [0, 0, 1, 2, 9]
    assert {a.tobytes() for a in full.train.images} == {a.tobytes() for a in im}


def test_image_folder(tmp_path):
    for cls in ("cat", "dog"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(5):
            Image.fromarray(RNG.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(
                tmp_path / "imgs" / cls / f"{i}.{'png' if i % 2 else 'jpg'}")
    ds = load_dataset(str(tmp_path / "imgs"), res=16, val_fraction=0.2)
    assert ds.classes == ["cat", "dog"] and ds.res == 16 and len(ds.train) == 8 and len(ds.val) == 2
    native = load_dataset(str(tmp_path / "imgs"))
    assert native.res == 20  # centre square crop of 24x20
    (tmp_path / "imgs" / "dog" / "broken.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match="broken.png"):
        load_dataset(str(tmp_path / "imgs"))


def test_bad_inputs_name_the_problem(tmp_path):
    with pytest.raises(DataError, match="cifar10 not found in .*--download"):
        load_dataset("cifar10", tmp_path, official=False)
    folder, _, _ = write_cifar10(tmp_path)
    raw = (folder / "data_batch_3.bin").read_bytes()
    (folder / "data_batch_3.bin").write_bytes(raw[:-100])
    with pytest.raises(DataError, match="data_batch_3.bin has .* truncated"):
        load_dataset("cifar10", tmp_path, official=False)
    (folder / "data_batch_3.bin").write_bytes(raw)
    (folder / "data_batch_5.bin").unlink()
    with pytest.raises(DataError, match="no data_batch_5.bin"):
        load_dataset("cifar10", tmp_path, official=False)
    with pytest.raises(DataError, match="unknown dataset 'nonsense'"):
        load_dataset("nonsense", tmp_path)
    with pytest.raises(DataError, match="--res 64 is larger than shapes"):
        resize(np.zeros((1, 32, 32, 3), np.uint8), 64, "shapes")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "cifar-10-binary.tar.gz").write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(DataError, match="damaged"):
        load_dataset("cifar10", tmp_path / "bad", official=False)


def test_resize_is_an_area_filter():
    im = np.zeros((1, 32, 32, 3), np.uint8)
    im[0, ::2] = 200  # stripes of one pixel average to 100 at half size
    np.testing.assert_array_equal(resize(im, 16), np.full((1, 16, 16, 3), 100, np.uint8))
    assert resize(im, 32) is im and resize(im, 24).shape == (1, 24, 24, 3)


def test_split_is_seeded_and_disjoint():
    s = Split(np.arange(100).reshape(100, 1, 1, 1).astype(np.uint8), np.arange(100))
    a_tr, a_va = split_train_val(s, seed=1)
    b_tr, b_va = split_train_val(s, seed=1)
    c_tr, c_va = split_train_val(s, seed=2)
    np.testing.assert_array_equal(a_va.labels, b_va.labels)
    assert not np.array_equal(a_va.labels, c_va.labels)
    assert len(a_va) == 10 and not set(a_tr.labels) & set(a_va.labels)


def test_augment_crops_flips_and_is_seeded():
    grids = np.arange(2 * 32 * 32).reshape(2, 32, 32)
    a = augment(grids, np.random.default_rng(0))
    np.testing.assert_array_equal(a, augment(grids, np.random.default_rng(0)))
    assert a.shape == grids.shape
    padded = np.pad(grids, [(0, 0), (4, 4), (4, 4)], mode="reflect")
    for b in range(2):  # each output is a crop of the padded grid, maybe mirrored
        crops = [padded[b, y:y + 32, x:x + 32] for y in range(9) for x in range(9)]
        assert any(np.array_equal(a[b], c) or np.array_equal(a[b], c[:, ::-1]) for c in crops)
    images = np.zeros((3, 16, 16, 3), np.uint8)
    assert augment(images, np.random.default_rng(1)).shape == (3, 16, 16, 3)
    seen = {augment(grids, np.random.default_rng(s))[0, 0, 0] for s in range(20)}
    assert len(seen) > 3  # it does move things


def test_random_resized_crops_are_box_filtered_windows_of_the_full_image():
    """Each output is some square window of its own image, of side 3/4 of the image or more,
    box-filtered to res: no padding, so no mirrored pixels; seeded; the whole image when smallest=1."""
    images = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    a = random_resized_crops(images, 6, np.random.default_rng(1))
    np.testing.assert_array_equal(a, random_resized_crops(images, 6, np.random.default_rng(1)))
    assert a.shape == (5, 6, 6, 3) and a.dtype == np.uint8
    for b in range(5):
        windows = [resize(images[b:b + 1, t:t + k, l:l + k], 6)[0]
                   for k in (6, 7, 8) for t in range(9 - k) for l in range(9 - k)]
        assert any(np.array_equal(a[b], w) for w in windows)
    np.testing.assert_array_equal(random_resized_crops(images, 4, np.random.default_rng(2), smallest=1.0),
                                  resize(images, 4))


def test_token_cache_reuses_and_rebuilds(tmp_path, monkeypatch):
    images = RNG.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    pal = Palette(RNG.uniform(-1, 1, (16, 3)))
    first = cached_tokens(images, pal, tmp_path)
    np.testing.assert_array_equal(first, pal.encode(images))
    calls = []
    monkeypatch.setattr(pal, "encode", lambda x: calls.append(1) or Palette.encode(pal, x))
    np.testing.assert_array_equal(cached_tokens(images, pal, tmp_path), first)
    assert calls == []  # reused
    npy = next(tmp_path.glob("tokens-*.npy"))
    npy.write_bytes(npy.read_bytes()[:-10])  # damaged
    np.testing.assert_array_equal(cached_tokens(images, pal, tmp_path), first)
    assert calls == [1]  # rebuilt
    other = Palette(RNG.uniform(-1, 1, (16, 3)))
    cached_tokens(images, other, tmp_path)
    assert len(list(tmp_path.glob("tokens-*.npy"))) == 2  # keyed by palette


@pytest.mark.parametrize("draw", [make_shapes, make_streaks])
def test_procedural_data_deterministic_balanced_any_resolution(draw):
    a, la = draw(50, 16, np.random.default_rng(4))
    b, lb = draw(50, 16, np.random.default_rng(4))
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(la, lb)
    counts = np.bincount(la)
    assert counts.min() > 0 and counts.max() - counts.min() <= 1                # balanced classes
    for res in (4, 7, 24):
        assert draw(10, res, np.random.default_rng(0))[0].shape == (10, res, res, 3)
    assert not np.array_equal(draw(10, 16, np.random.default_rng(5))[0], a[:10])


def test_streaks_class_likelihood_is_exact_and_judges_images():
    """class_log_likelihoods against the chain rule written pixel by pixel; it names the class of
    every real image, a flat image is equally likely under every class, and noise is no class."""
    x, y = make_streaks(200, 6, np.random.default_rng(2))
    L = class_log_likelihoods(x)                                                # (200, K)
    p = STAY + (1 - STAY) / 2
    dark = x[..., 0] == STREAK_DARK
    for i in range(3):
        for c, (dy, dx) in enumerate(OFFSETS):
            want = 0.0
            for yy in range(6):
                for xx in range(6):
                    py, px = yy - dy, xx - dx
                    first = py < 0 or (dy == 0 and px < 0)                      # a chain's first pixel
                    if not first:
                        same = dark[i, yy, xx] == dark[i, py % 6, px % 6]
                    want += np.log(0.5) if first else np.log(p if same else 1 - p)
            assert L[i, c] == pytest.approx(want)
    assert (L.argmax(1) == y).mean() > 0.97
    flat = np.full((1, 6, 6, 3), STREAK_LIGHT, np.uint8)
    np.testing.assert_allclose(class_log_likelihoods(flat), class_log_likelihoods(flat)[0, 0])
    noise = np.where(np.random.default_rng(1).random((16, 8, 8, 1)) < 0.5, STREAK_DARK, STREAK_LIGHT)
    line = judge_samples(np.repeat(noise, 3, 3).astype(np.uint8), np.random.default_rng(0))
    assert line.endswith("0 of 16 are as likely as the middle 90% of real images of their class")
    real = judge_samples(make_streaks(40, 8, np.random.default_rng(3))[0], np.random.default_rng(0))
    assert "10 horizontal, 10 vertical" in real


def test_streaks_are_two_grey_levels():
    assert set(np.unique(make_streaks(20, 8, np.random.default_rng(0))[0])) == {STREAK_DARK, STREAK_LIGHT}


def _ridge_accuracy(x: np.ndarray, y: np.ndarray, n_fit: int = 2500) -> float:
    """Held-out accuracy of ridge regression on raw pixels (one-vs-rest, closed form)."""
    X = x.reshape(len(x), -1).astype(np.float64) / 255.0
    X = np.concatenate([X - X[:n_fit].mean(0), np.ones((len(X), 1))], 1)
    Y = np.eye(10)[y]
    W = np.linalg.solve(X[:n_fit].T @ X[:n_fit] + 10.0 * np.eye(X.shape[1]), X[:n_fit].T @ Y[:n_fit])
    return float(np.mean((X[n_fit:] @ W).argmax(1) == y[n_fit:]))


def test_shapes_is_not_linearly_trivial():
    """Ridge regression on raw pixels stays far from 100% on held-out images: colour, size,
    position and texture vary independently of the class. The same regression reads a class that
    raw pixels do show (a planted pixel per class), so the low number is the data's."""
    x, y = make_shapes(3000, 16, np.random.default_rng(0))
    acc = _ridge_accuracy(x, y)
    assert 0.05 < acc < 0.5, acc
    planted = x.copy()
    planted[:, 0, :10] = 0
    planted[np.arange(len(y)), 0, y] = 255                  # row 0: a white pixel at the class's column
    assert _ridge_accuracy(planted, y) > 0.9


def test_streaks_repeat_along_their_class_offset_and_hide_the_class_from_raw_pixels():
    """Each class repeats its pixels along its own offset (y, x) -> (y - dy, x - dx) with probability
    STAY (plus half of the fresh coins); every class's mean image is the same (each pixel dark w.p.
    1/2), so ridge regression on raw pixels stays far below the K agreement fractions, what a model
    drawing pixel by pixel must learn to use, which separate the classes. (Raw pixels are above
    chance: a linear score can still see how widely the pixels along one line swing together.)"""
    K, n = len(OFFSETS), 16
    x, y = make_streaks(4000, n, np.random.default_rng(0))
    dark = (x[..., 0] == STREAK_DARK).astype(np.float64)                        # (N, n, n)
    means = np.stack([dark[y == c].mean(0) for c in range(K)])
    assert np.abs(means - 0.5).max() < 0.2                                      # 1,000 images a class

    def agreement(dy, dx):                                                      # (N,) P(s = shifted s)
        now = dark[:, dy:, max(dx, 0):n + min(dx, 0)]
        before = dark[:, :n - dy, max(-dx, 0):n - max(dx, 0)]
        return (now == before).mean((1, 2))
    same = np.stack([agreement(dy, dx) for dy, dx in OFFSETS], 1)               # (N, K)
    for c in range(K):
        assert same[y == c, c].mean() > STAY + (1 - STAY) / 2 - 0.05            # its own offset
        assert same[y == c].mean(0).argmax() == c                               # more than any other

    def ridge(F):
        F = np.concatenate([F - F[:3000].mean(0), np.ones((len(F), 1))], 1)
        Y = np.eye(K)[y]
        W = np.linalg.solve(F[:3000].T @ F[:3000] + 10.0 * np.eye(F.shape[1]), F[:3000].T @ Y[:3000])
        return np.mean((F[3000:] @ W).argmax(1) == y[3000:])
    assert ridge(dark.reshape(len(x), -1)) < 1 / K + 0.15
    assert ridge(same) > 0.9  # a linear read-out of the K agreements


# ---- downloads ---------------------------------------------------------------------------------
def make_archive(tmp_path):
    folder, _, _ = write_cifar10(tmp_path / "src")
    archive = tmp_path / "served" / "cifar-10-binary.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-bin")
    return archive, hashlib.md5(archive.read_bytes()).hexdigest()


def test_download_from_file_url_verifies_and_extracts(tmp_path):
    archive, md5 = make_archive(tmp_path)
    dest = tmp_path / "data"
    download("cifar10", dest, url=archive.as_uri(), md5=md5)
    assert (dest / "cifar-10-batches-bin" / "data_batch_1.bin").is_file()
    assert len(load_dataset("cifar10", dest, official=False).train) == 18
    with pytest.raises(DataError, match="MD5 .* expected 0+"):
        download("cifar10", tmp_path / "other", url=archive.as_uri(), md5="0" * 32)
    assert not (tmp_path / "other" / "cifar-10-binary.tar.gz.part").exists()


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Serves one file, honouring 'Range: bytes=N-' as servers that allow resuming do."""
    payload = b""
    ranges_seen = []

    def do_GET(self):
        rng = self.headers.get("Range")
        start = int(rng.split("=")[1].rstrip("-")) if rng else 0
        RangeHandler.ranges_seen.append(start)
        body = self.payload[start:]
        self.send_response(206 if rng else 200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_download_resumes_a_partial_file(tmp_path):
    archive, md5 = make_archive(tmp_path)
    RangeHandler.payload, RangeHandler.ranges_seen = archive.read_bytes(), []
    server = http.server.HTTPServer(("127.0.0.1", 0), RangeHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        dest = tmp_path / "data"
        dest.mkdir()
        half = len(RangeHandler.payload) // 2
        (dest / "cifar-10-binary.tar.gz.part").write_bytes(RangeHandler.payload[:half])
        url = f"http://127.0.0.1:{server.server_port}/cifar-10-binary.tar.gz"
        download("cifar10", dest, url=url, md5=md5, timeout=10)
    finally:
        server.shutdown()
        server.server_close()
    assert RangeHandler.ranges_seen == [half]  # asked only for the missing half
    assert hashlib.md5((dest / "cifar-10-binary.tar.gz").read_bytes()).hexdigest() == md5


def test_download_offline_says_where_to_put_files(tmp_path):
    import socket
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DataError, match=r"could not download .* put cifar-10-binary.tar.gz"):
        download("cifar10", tmp_path, url=f"http://127.0.0.1:{port}/x.tar.gz", timeout=5)
    with pytest.raises(DataError, match="--download knows"):
        download("mnist", tmp_path)
