"""§2.1/§3.4 pre-training: objectives, Adam, schedule, and train.py's run: exact resume, Ctrl-C,
divergence, bad input."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from minigpt_img import Tensor, ops
from minigpt_img.checkpoint import load_arrays, read_meta
from minigpt_img.model import GPTConfig, ImageGPT
from minigpt_img.objectives import ar_inputs, ar_loss, bert_loss, bert_mask, image_losses, unigram_entropy
from minigpt_img.optim import Adam, lr_at
from minigpt_img.runconfig import ConfigError, RunConfig, resolve_config, with_presets

FIELDS = {f: RunConfig.__dataclass_fields__[f].default for f in RunConfig.__dataclass_fields__}
from minigpt_img.trainer import Trainer, TrainingDiverged

from helpers import load_script, write_image_folder  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def test_ar_inputs_shift_right_behind_sos():
    x = np.array([[3, 1, 4, 1], [5, 9, 2, 6]])
    np.testing.assert_array_equal(ar_inputs(x, sos=10), [[10, 3, 1, 4], [10, 5, 9, 2]])


def test_ar_loss_predicts_each_token_from_the_ones_before():
    cfg = GPTConfig(n_layer=1, n_embd=8, n_head=2, n_px=2, vocab=5)
    m = ImageGPT(cfg, np.random.default_rng(0))
    m.lm_head.weight.data = np.random.default_rng(1).standard_normal((8, 5)).astype(np.float32)
    x = np.array([[0, 1, 2, 3], [4, 4, 0, 1]])
    logits = m(ar_inputs(x, cfg.sos)).data
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    manual = -np.mean(np.take_along_axis(logp, x[..., None], -1))
    assert ar_loss(m, x).item() == pytest.approx(manual, rel=1e-5)
    per_image = -np.take_along_axis(logp, x[..., None], -1)[..., 0].mean(axis=1)       # (B,)
    np.testing.assert_allclose(image_losses(logits, x), per_image, rtol=1e-5)


def test_bert_mask_rate_and_masked_only_loss_averaged_per_image():
    mask = bert_mask((200, 256), 0.15, np.random.default_rng(0))
    assert mask.mean() == pytest.approx(0.15, abs=0.005)
    assert bert_mask((1, 1), 1e-9, np.random.default_rng(0)).sum() == 1  # never empty
    assert bert_mask((50, 3), 1e-9, np.random.default_rng(0)).sum(axis=1).min() == 1  # no image empty
    cfg = GPTConfig(n_layer=1, n_embd=8, n_head=2, n_px=3, vocab=5)
    m = ImageGPT(cfg, np.random.default_rng(0))
    m.lm_head.weight.data = np.random.default_rng(1).standard_normal((8, 5)).astype(np.float32)
    x = np.random.default_rng(2).integers(0, 5, (2, 9))
    mask = np.zeros((2, 9), bool)
    mask[0, [1, 4]] = mask[1, 7] = True
    logits = m(x, causal=False, input_mask=mask).data
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, x[..., None], -1)[..., 0]
    # released iGPT: each image's masked positions are averaged first, then the images
    per_image = (nll[0, [1, 4]].mean() + nll[1, 7]) / 2
    assert not np.isclose(per_image, nll[mask].mean(), rtol=1e-3)  # the two averages differ here
    assert bert_loss(m, x, mask).item() == pytest.approx(per_image, rel=1e-5)
    np.testing.assert_allclose(image_losses(logits, x, mask), [nll[0, [1, 4]].mean(), nll[1, 7]], rtol=1e-5)
    y = x.copy()
    y[~mask] = (y[~mask] + 1) % 5  # other targets differ, the masked ones' inputs are hidden anyway
    y_logits = m(y, causal=False, input_mask=mask)
    assert not np.allclose(y_logits.data, logits)  # unmasked inputs are seen...
    w = mask.astype(float)
    assert ops.cross_entropy(Tensor(logits), y, weights=w).item() == pytest.approx(nll[mask].mean(), rel=1e-5)


def test_adam_matches_a_hand_computed_step():
    p = Tensor(np.array([1.0, -2.0]), requires_grad=True)
    opt = Adam([p], lr=0.1, betas=(0.9, 0.95), eps=1e-8)
    grads = [np.array([0.5, -1.0]), np.array([0.1, 0.3])]
    m = v = np.zeros(2)
    expected = p.data.copy()
    for t, g in enumerate(grads, 1):
        p.grad = g.copy()
        opt.step()
        m = 0.9 * m + 0.1 * g
        v = 0.95 * v + 0.05 * g * g
        expected = expected - 0.1 * (m / (1 - 0.9 ** t)) / (np.sqrt(v / (1 - 0.95 ** t)) + 1e-8)
        np.testing.assert_allclose(p.data, expected, rtol=1e-12)
    # decoupled weight decay shrinks the weights too
    q = Tensor(np.array([2.0]), requires_grad=True)
    q.grad = np.zeros(1)
    Adam([q], lr=0.1, weight_decay=0.5).step()
    assert q.data[0] == pytest.approx(2.0 - 0.1 * 0.5 * 2.0)


def test_schedule_values():
    assert lr_at(0, 1.0, 10, 100) == pytest.approx(0.1)
    assert lr_at(9, 1.0, 10, 100) == pytest.approx(1.0)
    assert lr_at(10, 1.0, 10, 100) == pytest.approx(1.0)
    assert lr_at(55, 1.0, 10, 100) == pytest.approx(0.5)
    assert lr_at(100, 1.0, 10, 100) == pytest.approx(0.0)
    assert lr_at(80, 1.0, 10, 100, decay="constant") == 1.0


def test_unigram_entropy():
    assert unigram_entropy(np.array([0, 1, 2, 3]), 8) == pytest.approx(np.log(4))
    # not uniform: frequencies 3/4 and 1/4, colours never seen count nothing
    assert unigram_entropy(np.array([[5, 5], [5, 2]]), 8) == pytest.approx(-(0.75 * np.log(0.75) + 0.25 * np.log(0.25)))
    assert unigram_entropy(np.zeros(10, np.int64), 3) == 0.0


# ---- the run ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("imgs"), per_class=12)


def tiny(image_folder, out, **kw):
    base = dict(size="nano", res=8, data=str(image_folder), palette_size=16, batch_size=4,
                steps=6, eval_every=3, eval_images=8, log_every=1, out=str(out),
                cache_dir=str(out.parent / "cache"), samples=4)
    base.update(kw)
    return resolve_config(base)


def test_run_writes_its_files_and_learns(image_folder, tmp_path):
    run = Trainer(tiny(image_folder, tmp_path / "run", steps=40, lr=1e-2), log=lambda *a: None)
    assert run.train() == "done"
    for name in ("ckpt.npz", "metrics.jsonl", "loss.png", "samples.png"):
        assert (tmp_path / "run" / name).is_file(), name
    records = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r["loss"] for r in records if r["kind"] == "eval"]
    assert evals[-1] < evals[0] and evals[-1] < run.data.entropy
    assert Image.open(tmp_path / "run" / "samples.png").size[0] > 16


def test_resume_is_bit_identical(image_folder, tmp_path):
    straight = Trainer(tiny(image_folder, tmp_path / "a"), log=lambda *a: None)
    straight.train()

    def stop_at_3(run):
        if run.step == 3:
            run.stop_reason = "interrupted"

    first = Trainer(tiny(image_folder, tmp_path / "b"), log=lambda *a: None)
    assert first.train(on_step=stop_at_3) == "interrupted"
    assert int(json.loads(str(load_arrays(tmp_path / "b" / "ckpt.npz")["config"]))["meta"]["step"]) == 3
    cfg = resolve_config({"out": str(tmp_path / "b")}, resume=True)
    second = Trainer(cfg, resume=True, log=lambda *a: None)
    assert second.step == 3 and second.train() == "done"
    for (name, a), (_, b) in zip(straight.model.named_parameters(), second.model.named_parameters()):
        assert np.array_equal(a.data, b.data), name
    lines = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(l)["step"] for l in lines if json.loads(l)["kind"] == "train"] == [1, 2, 3, 4, 5, 6]


def test_time_budget_counts_every_session_of_a_resumed_run(image_folder, tmp_path):
    out = tmp_path / "budget"
    first = Trainer(tiny(image_folder, out, steps=50), log=lambda *a: None)
    first.train(on_step=lambda r: setattr(r, "stop_reason", "interrupted") if r.step == 2 else None)
    trained = json.loads(str(load_arrays(out / "ckpt.npz")["config"]))["meta"]["train_seconds"]
    assert trained > 0
    # a budget smaller than what the first session already used: the resumed run stops at once
    cfg = resolve_config({"out": str(out), "time_budget": trained / 2 / 60}, resume=True)
    second = Trainer(cfg, resume=True, log=lambda *a: None)
    assert second.train() == "time budget" and second.step == 3
    again = json.loads(str(load_arrays(out / "ckpt.npz")["config"]))["meta"]["train_seconds"]
    assert again > trained


def test_snapshots_keep_the_weights_of_every_evaluation(image_folder, tmp_path):
    run = Trainer(tiny(image_folder, tmp_path / "snap", snapshots=True), log=lambda *a: None)
    run.train()
    snaps = sorted((tmp_path / "snap" / "snapshots").glob("step*.npz"))
    assert [p.name for p in snaps] == ["step0000003.npz", "step0000006.npz"]
    arrays = load_arrays(snaps[-1])
    assert not any(k.startswith("opt/") for k in arrays)  # weights only
    meta = json.loads(str(arrays["config"]))["meta"]
    assert meta["step"] == 6 and meta["val_loss"] > 0
    last = load_arrays(tmp_path / "snap" / "ckpt.npz")
    assert np.array_equal(arrays["model/transformer.wte.weight"], last["model/transformer.wte.weight"])


def test_nan_loss_stops_and_keeps_the_last_checkpoint(image_folder, tmp_path):
    out = tmp_path / "nan"
    first = Trainer(tiny(image_folder, out), log=lambda *a: None)
    first.train(on_step=lambda r: setattr(r, "stop_reason", "interrupted") if r.step == 2 else None)
    before = (out / "ckpt.npz").read_bytes()

    def poison(run):
        run.model.transformer.wte.weight.data[:] = np.nan

    run = Trainer(resolve_config({"out": str(out)}, True), resume=True, log=lambda *a: None)
    with pytest.raises(TrainingDiverged, match="loss became nan at step 4"):
        run.train(on_step=poison)
    assert (out / "ckpt.npz").read_bytes() == before


def test_configuration_errors(image_folder, tmp_path):
    out = tmp_path / "cfg"
    Trainer(tiny(image_folder, out, steps=1), log=lambda *a: None).train()
    with pytest.raises(ConfigError, match="exists: pass --resume"):
        Trainer(tiny(image_folder, out, steps=1), log=lambda *a: None)
    with pytest.raises(ConfigError, match="trained with --palette-size 16, not 32"):
        resolve_config({"out": str(out), "palette_size": 32}, resume=True)
    with pytest.raises(ConfigError, match="--size huge is not valid: choose one of nano, micro"):
        Trainer(tiny(image_folder, tmp_path / "x", size="huge"), log=lambda *a: None)


def test_streaks_brings_its_first_run_preset_and_a_flag_overrides_it(image_folder):
    """runconfig.DATA_PRESETS: the default data trains at 8x8, batch 8, lr 1.5e-3 for 4 epochs and
    without augmentation; other data keeps BASE (crops when pre-training, the Wide-ResNet
    augmentation when fine-tuning) and the size's batch; a flag beats both."""
    c = resolve_config({}, resume=False)
    assert (c.data, c.res, c.batch_size, c.lr, c.epochs, c.augment) == ("streaks", 8, 8, 1.5e-3, 4.0, "none")
    c = resolve_config({"res": 16, "augment": "wrn"}, resume=False)
    assert (c.res, c.augment, c.batch_size) == (16, "wrn", 8)
    c = resolve_config({"steps": 50}, resume=False)
    assert (c.steps, c.epochs) == (50, None)      # the run's length is --steps; the config line says so
    c = resolve_config({"data": str(image_folder)}, resume=False)
    assert (c.res, c.batch_size, c.lr, c.epochs, c.augment) == (16, 16, 3e-3, 1.0, "crop")
    assert RunConfig(**with_presets({**FIELDS, "data": str(image_folder), "finetune": "pre.npz"})).augment == "wrn"     # §4.5, as the paper
    assert RunConfig(**with_presets({**FIELDS, "finetune": "pre.npz"})).augment == "none"                         # streaks: never
    with pytest.raises(ConfigError, match="--augment flip is not valid: choose one of wrn, crop, none"):
        RunConfig(augment="flip")


def test_streaks_batches_are_the_images_themselves(tmp_path):
    """A flip turns one diagonal class of streaks into the other, so its batches are not augmented:
    every image of a batch is a training image, unchanged, with its own label."""
    run = Trainer(resolve_config(dict(size="nano", steps=1, out=str(tmp_path / "o"), cache_dir=str(tmp_path / "c"),
                                      samples=0)), log=lambda *a: None)
    x, y, _ = run.batch(0, 0)
    rows = {t.tobytes(): label for t, label in zip(run.data.train_tokens.astype(np.int64),
                                                   run.data.ds.train.labels)}
    assert [rows.get(t.tobytes()) for t in x] == list(y)


def test_crop_augmentation_cuts_the_full_resolution_images_then_quantises(image_folder, tmp_path):
    """--augment crop (the paper's pre-training augmentation): the batch is made from the 8x8 images
    as loaded, cropped and box-filtered to --res 4, then quantised: valid tokens, not the plain ones."""
    run = Trainer(tiny(image_folder, tmp_path / "crop", res=4, augment="crop"), log=lambda *a: None)
    assert run.data.ds.full_train.shape[1:] == (8, 8, 3)
    assert len(run.data.ds.full_train) == len(run.data.train_tokens)
    x, y, _ = run.batch(0, 0)
    assert x.shape == (4, 16) and x.min() >= 0 and x.max() < len(run.data.palette)
    plain = {t.tobytes() for t in run.data.train_tokens.astype(np.int64)}
    assert any(t.tobytes() not in plain for t in x)
    run.train()
    assert (tmp_path / "crop" / "ckpt.npz").exists()


def run_script(*args, timeout=300, **kw):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, str(REPO / "train.py"), *args], capture_output=True,
                          text=True, timeout=timeout, env=env, **kw)


def test_script_bad_input_is_one_line(tmp_path):
    r = run_script("--size", "huge", "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0
    assert "--size: invalid choice: 'huge'" in r.stderr and "Traceback" not in r.stderr
    r = run_script("--data", "cifar10", "--data-dir", str(tmp_path), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "cifar10 not found" in r.stderr and "Traceback" not in r.stderr
    r = run_script("--resume", "--out", str(tmp_path / "none"))
    assert r.returncode == 2 and "no checkpoint at" in r.stderr


def test_the_papers_sizes_train_on_cifar10_and_say_where_to_get_it(tmp_path):
    """python train.py --size s --res 32 in a fresh folder: CIFAR-10 is the data (not the toy set),
    and without its files one line names --download and --data-dir; nothing is written."""
    assert resolve_config({"size": "s", "res": 32}).data == "cifar10"
    assert resolve_config({"size": "s", "data": "streaks"}).data == "streaks"   # asked for: kept
    assert resolve_config({"size": "mini"}).data == "streaks"
    r = run_script("--size", "s", "--res", "32", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr
    assert "cifar10 not found" in r.stderr and "--data-dir" in r.stderr and "--download" in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_is_acknowledged_at_once_and_a_second_stops_within_seconds(tmp_path):
    """The first Ctrl-C says at once that the run stops after this step; a second stops it now,
    with one line and exit code 130, and the checkpoint it keeps loads and resumes."""
    import threading
    out = tmp_path / "twice"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "train.py"), "--size", "mini", "--res", "16", "--data", "shapes",
         "--palette-size", "16", "--batch-size", "16", "--steps", "100000", "--out", str(out), "--cache-dir",
         str(tmp_path / "cache"), "--log-every", "1", "--ckpt-every", "0.0001", "--threads", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    seen = []  # (time, text) read from stderr

    def read():
        while chunk := os.read(proc.stderr.fileno(), 4096):
            seen.append((time.time(), chunk.decode(errors="replace")))
    threading.Thread(target=read, daemon=True).start()
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not (
            (out / "ckpt.npz").exists() and (out / "metrics.jsonl").exists()
                                          and len((out / "metrics.jsonl").read_text().splitlines()) >= 3):
        time.sleep(0.1)
    sent = time.time()
    proc.send_signal(signal.SIGINT)
    while time.time() < sent + 1 and not any("stopping after this step" in s for _, s in seen):
        time.sleep(0.02)
    acked = [t for t, s in seen if "stopping after this step" in s]
    assert acked and acked[0] - sent < 1.0, "".join(s for _, s in seen)[-2000:]
    second = time.time()
    proc.send_signal(signal.SIGINT)
    code = proc.wait(timeout=5)
    assert time.time() - second < 5
    text = "".join(s for _, s in seen)
    assert code in (130, 0) and "Traceback" not in text, text[-2000:]
    step = json.loads(str(load_arrays(out / "ckpt.npz")["config"]))["meta"]["step"]
    r = run_script("--resume", "--out", str(out), "--cache-dir", str(tmp_path / "cache"), "--steps", str(step + 1),
                   "--samples", "0", "--threads", "1")
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(str(load_arrays(out / "ckpt.npz")["config"]))["meta"]["step"] == step + 1


def test_a_pretraining_run_ended_by_its_time_budget_draws_its_samples(image_folder, tmp_path):
    run = Trainer(tiny(image_folder, tmp_path / "tb", steps=1000, time_budget=1e-9, samples=2), log=lambda *a: None)
    assert run.train() == "time budget" and run.step == 1
    assert (tmp_path / "tb" / "samples.png").is_file() and (tmp_path / "tb" / "loss.png").is_file()


def test_script_ctrl_c_saves_and_tells_how_to_resume(image_folder, tmp_path):
    out = tmp_path / "sig"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "train.py"), "--size", "nano", "--res", "8", "--data",
         str(image_folder), "--palette-size", "16", "--batch-size", "4", "--steps", "100000",
         "--out", str(out), "--cache-dir", str(tmp_path / "cache"), "--log-every", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 240
    while time.time() < deadline and not (out / "metrics.jsonl").exists():
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-2000:]
    assert "python train.py --resume --out" in stdout
    meta = json.loads(str(load_arrays(out / "ckpt.npz")["config"]))["meta"]
    assert 0 < meta["step"] < 100000


def test_released_palette_file_is_used_instead_of_fitting(image_folder, tmp_path):
    clusters = np.random.default_rng(3).uniform(-1, 1, (16, 3)).round(4)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"clusters": clusters.tolist()}))
    run = Trainer(tiny(image_folder, tmp_path / "pal", palette=str(tmp_path / "preprocessor_config.json"),
                           steps=1), log=lambda *a: None)
    np.testing.assert_allclose(run.data.palette.centers, clusters, rtol=1e-6)
    with pytest.raises(ConfigError, match="holds 16 colours, not --palette-size 32"):
        Trainer(tiny(image_folder, tmp_path / "pal2", palette_size=32,
                         palette=str(tmp_path / "preprocessor_config.json")), log=lambda *a: None)


def test_the_vocabulary_is_the_colours_the_images_hold(tmp_path):
    """Images with fewer distinct colours than --palette-size: one token per colour, and the model,
    its checkpoint, a resumed run and a fine-tuning run all have that vocabulary."""
    flat = write_image_folder(tmp_path / "flat", per_class=8, noise=1)   # three flat greys
    lines = []
    run = Trainer(tiny(flat, tmp_path / "run", steps=3), log=lines.append)
    assert len(run.data.palette) == 3 and run.model.config.vocab == 3
    assert any("3-colour palette (the images hold only 3 distinct colours)" in l for l in lines)
    assert run.train() == "done"
    assert read_meta(tmp_path / "run" / "ckpt.npz")[0].vocab == 3
    resumed = Trainer(resolve_config({"out": str(tmp_path / "run"), "steps": 5}, resume=True), resume=True,
                      log=lambda *a: None)
    assert resumed.model.config.vocab == 3 and resumed.train() == "done"
    tuned = Trainer(resolve_config({"finetune": str(tmp_path / "run" / "ckpt.npz"), "steps": 2,
                                    "out": str(tmp_path / "tuned")}, resume=False), log=lambda *a: None)
    assert tuned.model.config.vocab == 3 and tuned.train() == "done"


def test_the_time_estimate_leaves_out_compilation_and_respects_the_budget(image_folder, tmp_path):
    run = Trainer(tiny(image_folder, tmp_path / "eta", steps=10000, time_budget=0.5), log=lambda *a: None)
    line = run.estimate(per_step=0.1, first_seconds=30.0)
    assert line.startswith("about 0.1 s per step") and "16.7 min for the 10000 steps to go" in line
    assert "numba compiled the kernels" in line and "--time-budget stops the run in 30 s" in line
    assert "compiled" not in run.estimate(per_step=0.1, first_seconds=0.15)
    assert "days" not in line and "mpiexec" not in line


def test_a_run_of_days_is_told_what_would_fit():
    """iGPT-S at 32x32, one epoch of CIFAR-10 at ~20 s per step: days; the estimate names smaller
    sizes, a lower resolution and mpiexec over 8 and 64 machines, each with its time."""
    from minigpt_img.forecast import forecast, human_time, memory_line
    from minigpt_img.sizes import config_for
    s = config_for("s", 32)
    lines = forecast(20.0, 11250, 11250, s, "s")
    assert lines[0].startswith("about 20 s per step") and "2.6 days per epoch" in lines[0]
    assert "--size mini" in lines[1] and "--size micro" in lines[1] and "--res 16" in lines[1]
    assert "mpiexec -n N" in lines[2] and "N = 8:" in lines[2] and "N = 64:" in lines[2]
    number, unit = lines[2].split("N = 8: ")[1].split(" ")[:2]
    assert unit.startswith("hours") and 62.5 / 8 < float(number) < 62.5 / 8 * 1.5  # an eighth, plus the Allreduce
    assert forecast(0.05, 100, 100, s, "s") == ["about 0.05 s per step: 5 s per epoch, 5 s for the 100 steps to go"]
    assert [human_time(t) for t in (0.031, 45, 750, 3 * 3600, 9 * 86400)] == \
        ["0.031 s", "45 s", "12.5 min", "3.0 hours", "9.0 days"]
    assert "76.57M parameters, peak memory about 5.7 GiB at 4 images" in memory_line(s, 4)


def test_an_evaluation_batch_goes_through_passes_of_at_most_images_per_pass(image_folder, tmp_path, monkeypatch):
    """An evaluation's batch larger than sizes.images_per_pass is scored in groups of that many
    images, summing to the metrics of whole batches (BERT's loss too: each image's masked positions
    are averaged, and the batch's mask is drawn before the split)."""
    from minigpt_img import sizes
    for objective in ("ar", "bert"):
        run = Trainer(tiny(image_folder, tmp_path / f"passes-{objective}", eval_images=8, objective=objective),
                      log=lambda *a: None)
        cfg = run.model.config
        monkeypatch.setattr(sizes, "PASS_BYTES", 1 << 30)
        whole = run.measure(run.data.val_tokens, run.data.val_labels, batch_size=8)
        seen = []
        sums = run.task.sums
        run.task.sums = lambda model, x, y, mask: seen.append(len(x)) or sums(model, x, y, mask)
        monkeypatch.setattr(sizes, "PASS_BYTES", 3 * 4 * cfg.n_ctx * 4 * cfg.n_embd)  # three images per pass
        parts = run.measure(run.data.val_tokens, run.data.val_labels, batch_size=8)
        n = len(run.data.val_tokens)
        assert n > 3 and seen == [3] * (n // 3) + [n % 3] * (n % 3 > 0)
        assert parts["loss"] == pytest.approx(whole["loss"], rel=1e-6)


def test_a_stop_signal_during_evaluation_leaves_at_once(image_folder, tmp_path):
    run = Trainer(tiny(image_folder, tmp_path / "evalstop", eval_images=8), log=lambda *a: None)
    batches = []
    sums = run.task.sums
    run.task.sums = lambda model, x, y, mask: batches.append(1) or sums(model, x, y, mask)
    run.stop_reason = "interrupted"
    assert run.measure(run.data.val_tokens, run.data.val_labels, batch_size=1) is None
    assert batches == []                        # no batch evaluated once the stop was asked for
    for reason in (None, "early stop", "time budget"):  # a run that ends as planned still scores
        run.stop_reason, batches[:] = reason, []
        assert run.measure(run.data.val_tokens, run.data.val_labels, batch_size=1)["loss"] > 0
        assert len(batches) == len(run.data.val_tokens) > 1


def test_newcomer_flags(image_folder, tmp_path):
    assert resolve_config({"size": "S"}).size == "s"      # the README says iGPT-S
    lines = []
    Trainer(tiny(image_folder, tmp_path / "res7", res=7), log=lines.append)
    assert any("--res 7 is not a resolution the paper uses" in line for line in lines)
    r = run_script("--res", "0", "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "argument --res: 0 is not a whole number >= 1" in r.stderr


def test_the_loop_keeps_its_fair_share_up_to_date_and_says_when_it_changes(image_folder, tmp_path, capsys):
    class Share:  # FairShare's interface; the load is faked: busy from the third step on
        threads, calls = 2, 0

        def update(self):
            self.calls += 1
            if self.calls == 3:
                self.threads = 1
                return 1
            return None

        def describe(self):
            return "other processes keep 1.0 of 2 cores busy: 1 thread(s) now"
    share = Share()
    Trainer(tiny(image_folder, tmp_path / "run", steps=5, samples=0), log=lambda *a: None,
            fair_share=share).train()
    assert share.calls == 5
    assert capsys.readouterr().out.count("1 thread(s) now") == 1


def test_train_py_adapts_threads_unless_told_a_count(monkeypatch):
    """train.py hands the Trainer a FairShare by default and none when --threads fixes the count."""
    script = load_script("train")
    seen = []

    class Stub:
        def __init__(self, cfg, resume=False, comm=None, fair_share=None, **kw):
            seen.append(fair_share)
            self.log = lambda *a: None

        def train(self):
            return "done"
    monkeypatch.setattr("minigpt_img.trainer.Trainer", Stub)
    monkeypatch.setattr("minigpt_img.runconfig.resolve_config", lambda given, resume: RunConfig())
    from minigpt_img.parallel import Solo
    assert script.train(script.parse([]), Solo()) == 0
    assert script.train(script.parse(["--threads", "1"]), Solo()) == 0
    assert type(seen[0]).__name__ == "FairShare" and seen[1] is None
    from minigpt_img.cli import fair_share

    class TwoRanks(Solo):
        size = 2
    assert fair_share(script.parse([]), TwoRanks()) is None  # mpiexec shares the cores out already
