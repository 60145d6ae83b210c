"""Sampling: determinism, temperature 0 = argmax, top-k, completions keep the given pixels, grids,
and sample.py end to end."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from minigpt_img import no_grad
from minigpt_img.checkpoint import save_model
from minigpt_img.model import GPTConfig, ImageGPT
from minigpt_img.objectives import ar_inputs
from minigpt_img.palette import Palette
from minigpt_img.plots import image_grid
from minigpt_img.sampling import choose, completion_rows, generate


REPO = Path(__file__).resolve().parent.parent
CFG = GPTConfig(n_layer=2, n_embd=16, n_head=2, n_px=4, vocab=6)


def model(seed=0):
    m = ImageGPT(CFG, np.random.default_rng(seed))
    m.lm_head.weight.data = np.random.default_rng(seed + 1).standard_normal((16, 6)).astype(np.float32)
    return m


def test_sampling_is_deterministic_given_a_seed():
    m = model()
    a = generate(m, 3, np.random.default_rng(5))
    b = generate(m, 3, np.random.default_rng(5))
    c = generate(m, 3, np.random.default_rng(6))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.shape == (3, CFG.n_ctx) and a.min() >= 0 and a.max() < CFG.vocab


def test_temperature_zero_is_argmax_decoding():
    m = model()
    out = generate(m, 2, np.random.default_rng(0), temperature=0.0)
    greedy = np.zeros((2, CFG.n_ctx), dtype=np.int64)
    with no_grad():
        for i in range(CFG.n_ctx):  # full forward each time: no cache involved
            logits = m(ar_inputs(greedy, CFG.sos)).data
            greedy[:, i] = logits[:, i].argmax(-1)
    np.testing.assert_array_equal(out, greedy)


def test_top_k_never_leaves_the_top_k():
    logits = np.random.default_rng(0).standard_normal((2000, 50))
    picks = choose(logits, np.random.default_rng(1).random(len(logits)), temperature=2.0, top_k=3)
    top3 = np.argsort(-logits, axis=1)[:, :3]
    assert all(p in row for p, row in zip(picks, top3))
    assert len(set(picks.tolist())) > 3  # it does sample
    full = choose(logits, np.random.default_rng(1).random(len(logits)), temperature=1.0)
    assert not all(p in row for p, row in zip(full, top3))


def test_choose_follows_the_softmax():
    logits = np.log(np.array([[0.7, 0.2, 0.1]] * 20000))
    picks = choose(logits, np.random.default_rng(0).random(len(logits)))
    np.testing.assert_allclose(np.bincount(picks, minlength=3) / 20000, [0.7, 0.2, 0.1], atol=0.015)


def test_completion_keeps_the_given_pixels():
    m = model()
    prefix = np.random.default_rng(3).integers(0, 6, (4, 7))
    out = generate(m, 4, np.random.default_rng(0), prefix=prefix)
    np.testing.assert_array_equal(out[:, :7], prefix)
    rng = np.random.default_rng(0)
    pal = Palette(rng.uniform(-1, 1, (6, 3)))
    images = pal.decode(rng.integers(0, 6, (2, 16)))            # images made of palette colours
    rows = completion_rows(m, pal, images, per_image=3, frac=0.5, rng=rng)
    assert rows.shape == (2 * 5, 4, 4, 3)
    rows = rows.reshape(2, 5, 4, 4, 3)
    np.testing.assert_array_equal(rows[:, 0], images)            # the original
    assert np.all(rows[:, 1, 2:] == 128)                         # the hidden half is grey
    for k in range(2, 5):
        np.testing.assert_array_equal(rows[:, k, :2], images[:, :2])  # given rows kept


def test_grid_layout():
    images = np.arange(5 * 2 * 3 * 3).reshape(5, 2, 3, 3).astype(np.uint8)
    g = image_grid(images, ncols=2, scale=2, pad=1)
    assert g.shape == (3 * (4 + 1) + 1, 2 * (6 + 1) + 1, 3)
    np.testing.assert_array_equal(g[1:5, 8:14], images[1].repeat(2, 0).repeat(2, 1))
    assert np.all(g[11:15, 8:14] == 128)  # the empty sixth cell stays background (mid-grey)


def test_caption_font_keeps_its_spaces():
    """Pillow's default scalable font at its default size 10 draws a space 2 pixels wide, which
    anti-aliasing closes up ("from microafter 787 stepson"): captions use a size whose spaces show."""
    from minigpt_img.plots import _font
    assert _font().getlength("a b") - _font().getlength("ab") >= 3


def test_chart_legend_sits_above_the_frame_off_the_data(tmp_path):
    """A loss curve starts at its highest value on the left and a probe at 100% runs along the top:
    the legend is drawn in the margin above the frame, so no series hides it or is hidden by it."""
    from minigpt_img.plots import COLOURS, line_chart
    path = line_chart({"train": ([0, 1, 2], [1.0, 1.0, 1.0]), "validation": ([0, 2], [0.0, 0.5])},
                      tmp_path / "c.png", title="t")
    img = np.asarray(Image.open(path).convert("RGB")).astype(int)
    frame = np.flatnonzero((img[:, 100] == 0).all(1))[0]        # the frame's top edge, under the title
    for colour in COLOURS[:2]:
        is_colour = (np.abs(img - np.array(colour)) < 40).all(2)
        assert is_colour[:frame].any()                           # its legend entry: above the frame


def test_sample_script(tmp_path):
    m = model()
    pal = np.random.default_rng(0).uniform(-1, 1, (6, 3))
    save_model(tmp_path / "ckpt.npz", m, pal, meta={"run": {"objective": "ar"}})
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, str(REPO / "sample.py"), "--ckpt", str(tmp_path / "ckpt.npz"),
                        "--n", "4", "--scale", "2"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / "samples.png").exists()  # a training run's own samples.png is never replaced
    picture = np.asarray(Image.open(tmp_path / "samples-seed0.png"))
    from minigpt_img.plots import GRID_PAD, LINE_HEIGHT
    caption = 2 * LINE_HEIGHT + 4                   # two lines of caption above the grid
    cell = 8 + GRID_PAD                             # 4 images of 8 px, with gaps
    assert picture.shape == (caption + cell + GRID_PAD, 4 * cell + GRID_PAD, 3)
    assert (picture[:caption] < 128).any()          # the caption is written
    save_model(tmp_path / "bert.npz", m, pal, meta={"run": {"objective": "bert"}})
    r = subprocess.run([sys.executable, str(REPO / "sample.py"), "--ckpt", str(tmp_path / "bert.npz")],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2 and "BERT" in r.stderr and "Traceback" not in r.stderr


def test_sample_script_judges_streaks_samples_by_the_datas_own_likelihood(tmp_path):
    m = ImageGPT(GPTConfig(n_layer=1, n_embd=16, n_head=2, n_px=4, vocab=2), np.random.default_rng(0))
    greys = np.array([[20.0] * 3, [235.0] * 3]) / 127.5 - 1                    # streaks' two states
    save_model(tmp_path / "ckpt.npz", m, greys, meta={"run": {"objective": "ar", "data": "streaks"}})
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, str(REPO / "sample.py"), "--ckpt", str(tmp_path / "ckpt.npz"),
                        "--n", "4"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "by the data's own likelihood the 4 samples are" in r.stdout


def test_sample_from_hugging_face_folder(tmp_path):
    from minigpt_img.checkpoint import export_hf
    pal = np.random.default_rng(0).uniform(-1, 1, (6, 3)).astype(np.float32)
    export_hf(model(), tmp_path / "hf", pal)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = tmp_path / "hf_samples.png"
    r = subprocess.run([sys.executable, str(REPO / "sample.py"), "--init-from", str(tmp_path / "hf"),
                        "--n", "2", "--scale", "1", "--out", str(out)],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    from minigpt_img.plots import GRID_PAD, LINE_HEIGHT
    n_px = 4                                            # two 4x4 samples side by side, under the caption
    assert Image.open(out).size == (2 * (n_px + GRID_PAD) + GRID_PAD, 2 * LINE_HEIGHT + 4 + n_px + 2 * GRID_PAD)
    (tmp_path / "hf" / "preprocessor_config.json").unlink()
    r = subprocess.run([sys.executable, str(REPO / "sample.py"), "--init-from", str(tmp_path / "hf")],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2 and "palette" in r.stderr and "Traceback" not in r.stderr


def test_generate_stops_when_asked():
    m = model()
    calls = []
    out = generate(m, 2, np.random.default_rng(0), should_stop=lambda: calls.append(1) or len(calls) > 3)
    assert out is None and len(calls) == 4


def shipped_model_works(tmp_path, name: str, n: int, probe_args: list) -> dict:
    """sample.py draws n images from weights/<name> and probe.py probes it with probe_args, in a
    fresh process each, as a fresh clone runs them with no training -> the probe's report."""
    ckpt = REPO / "weights" / name / "ckpt.npz"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, str(REPO / "sample.py"), "--ckpt", str(ckpt), "--n", str(n), "--out",
                        str(tmp_path / "s.png")], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0 and (tmp_path / "s.png").is_file(), r.stderr[-2000:]
    r = subprocess.run([sys.executable, str(REPO / "probe.py"), "--ckpt", str(ckpt), *probe_args, "--no-baselines",
                        "--out", str(tmp_path / "p"), "--cache-dir", str(tmp_path / "cache")],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads((tmp_path / "p" / "probe.json").read_text())


def test_the_shipped_first_run_model_samples_and_probes_in_a_fresh_clone(tmp_path):
    """weights/first-run, on the built-in data."""
    report = shipped_model_works(tmp_path, "first-run", 4, ["--layers", "3", "--max-train", "600", "--max-eval", "400"])
    assert report["best"]["eval_acc"] > 0.9


def test_the_shipped_cifar10_model_samples_and_probes_in_a_fresh_clone(tmp_path):
    """weights/cifar10-micro, on a small folder of photographs-to-be (the real CIFAR-10 is not in a
    fresh clone): its palette encodes any images."""
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for k in range(2):
            (tmp_path / "imgs" / split / f"c{k}").mkdir(parents=True)
            for i in range(10):
                pixels = np.clip(rng.normal(60 + 120 * k, 40, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(tmp_path / "imgs" / split / f"c{k}" / f"{i}.png")
    report = shipped_model_works(tmp_path, "cifar10-micro", 2, ["--data", str(tmp_path / "imgs"), "--layers", "2", "3"])
    assert [row["layer"] for row in report["layers"]] == [2, 3]
