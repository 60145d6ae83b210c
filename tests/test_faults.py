"""Faults and bad input, one test (or a few) per class: the last good checkpoint survives, and every
user's mistake ends in one line. Kills, full disks, read-only folders, two runs at once, crafted
files, impossible settings."""
import dataclasses
import errno
import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from minigpt_img import checkpoint as ck
from minigpt_img import files
from minigpt_img.data import DataError, load_dataset
from minigpt_img.files import FolderBusy, FolderLock, WriteError
from minigpt_img.model import GPTConfig, ImageGPT
from minigpt_img.palette import Palette, load_palette
from minigpt_img.runconfig import ConfigError, RunConfig, resolve_config
from minigpt_img.trainer import Trainer, TrainingDiverged

from helpers import write_cifar10, write_image_folder  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
QUIET = dict(log=lambda *a: None)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("faults"), per_class=10, step=70)


def config(folder, out, **kw):
    base = dict(size="nano", res=8, data=str(folder), palette_size=16, batch_size=4, steps=6,
                eval_every=3, eval_images=8, log_every=1, out=str(out), cache_dir=str(out.parent / "cache"),
                samples=0)
    return resolve_config({**base, **kw})


def stop_at(step):
    return lambda run: setattr(run, "stop_reason", "interrupted") if run.step == step else None


def meta_of(path):
    return json.loads(str(ck.load_arrays(path, keys=("config",))["config"]))["meta"]


def script(name, *args, timeout=300):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, str(REPO / name), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=env)


def one_line_error(r, code=2):
    assert r.returncode == code, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ")
    return last


# ---- 1. NaN: nothing non-finite is ever saved; a resumed run may change --lr and --clip ------------
def test_non_finite_weights_are_never_saved_over_a_good_checkpoint(folder, tmp_path):
    out = tmp_path / "nan"
    Trainer(config(folder, out), **QUIET).train(on_step=stop_at(2))
    good = (out / "ckpt.npz").read_bytes()
    run = Trainer(resolve_config({"out": str(out)}, True), resume=True, **QUIET)
    run.model.transformer.h[0].mlp.c_fc.weight.data[0, 0] = np.inf  # as a too-large update would
    with pytest.raises(TrainingDiverged, match="keeps the weights of step 2: resume with a lower --lr"):
        run.save()
    with pytest.raises(TrainingDiverged, match="at step 3"):
        run.train()
    assert (out / "ckpt.npz").read_bytes() == good


def test_an_update_that_overflows_the_weights_stops_before_any_save(folder, tmp_path):
    run = Trainer(config(folder, tmp_path / "big", lr=1e30, clip=0.0, steps=3), **QUIET)
    with pytest.raises(TrainingDiverged, match="no checkpoint was written: start again with a lower --lr"):
        run.train()
    assert not (tmp_path / "big" / "ckpt.npz").exists()


def test_a_resumed_run_may_lower_lr_and_clip_and_says_so(folder, tmp_path):
    out = tmp_path / "relr"
    Trainer(config(folder, out), **QUIET).train(on_step=stop_at(2))
    lines = []
    cfg = resolve_config({"out": str(out), "lr": 1e-4, "clip": 0.5}, resume=True)
    run = Trainer(cfg, resume=True, log=lines.append)
    assert any("--lr changed from 0.003 to 0.0001 at step 2" in line for line in lines)
    assert run.train() == "done"
    changes = meta_of(out / "ckpt.npz")["changes"]
    assert [(c["setting"], c["from"], c["to"], c["step"]) for c in changes] == \
        [("lr", 0.003, 1e-4, 2), ("clip", 1.0, 0.5, 2)]
    with pytest.raises(ConfigError, match="trained with --seed 0, not 1"):  # others stay fixed
        resolve_config({"out": str(out), "seed": 1}, resume=True)


# ---- 2. two runs, one folder ---------------------------------------------------------------------
def test_a_second_run_in_a_busy_folder_is_refused_naming_the_process(folder, tmp_path):
    out = tmp_path / "busy"
    first = Trainer(config(folder, out), **QUIET)
    with pytest.raises(ConfigError, match=f"in use by another run \\(process {os.getpid()}"):
        Trainer(config(folder, out), **QUIET)
    assert first.train() == "done"                           # the lock is released at the end
    assert Trainer(resolve_config({"out": str(out)}, True), resume=True, **QUIET).step == 6


def test_a_lock_left_by_a_killed_process_is_taken_over(tmp_path):
    code = (f"from minigpt_img.files import FolderLock; FolderLock({str(tmp_path)!r}).acquire(); "
            "print('held', flush=True); import time; time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(FolderBusy, match=f"process {holder.pid}"):
        FolderLock(tmp_path).acquire()
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    lock = FolderLock(tmp_path)
    lock.acquire()                                           # the kernel freed the dead holder's lock
    assert (tmp_path / ".lock").read_text().strip() == str(os.getpid())
    lock.release()


# ---- 3. untrusted files are checked before use ------------------------------------------------------
def test_a_damaged_optimiser_state_is_refused_on_resume(folder, tmp_path):
    out = tmp_path / "opt"
    Trainer(config(folder, out), **QUIET).train(on_step=stop_at(2))
    arrays = ck.load_arrays(out / "ckpt.npz")
    for bad in (np.float32(0.5), np.full((3,), np.nan, np.float32)):
        ck.save_arrays(out / "ckpt.npz", {**arrays, "opt/m.0": bad})
        with pytest.raises(ConfigError, match="damaged optimiser state"):
            Trainer(resolve_config({"out": str(out)}, True), resume=True, **QUIET)


def test_absurd_sizes_in_a_checkpoint_or_hf_config_are_refused_before_allocating(tmp_path):
    huge = {"config": {"n_layer": 10**6, "n_embd": 4096, "n_head": 8, "n_px": 32, "vocab": 512,
                       "bias": False}, "meta": {}}
    ck.save_arrays(tmp_path / "huge.npz", {"config": np.array(json.dumps(huge))})
    with pytest.raises(ck.CheckpointError, match="GiB available"):
        ck.load_model(tmp_path / "huge.npz")
    hf = tmp_path / "hf"
    ck.export_hf(ImageGPT(GPTConfig(n_layer=1, n_embd=8, n_head=2, n_px=2, vocab=5),
                          np.random.default_rng(0)), hf)
    cfg = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**cfg, "n_layer": 10**6, "n_embd": 8192}))
    with pytest.raises(ck.CheckpointError, match="GiB available"):
        ck.load_hf(hf)
    (hf / "config.json").write_text(json.dumps({**cfg, "n_embd": "wide"}))
    with pytest.raises(ck.CheckpointError, match="not an ImageGPT config"):
        ck.load_hf(hf)


def test_crafted_safetensors_headers_are_refused(tmp_path):
    path = tmp_path / "m.safetensors"
    ck.write_safetensors(path, {"w": np.ones((2, 3), np.float32)})
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    cases = {"length": struct.pack("<Q", 1 << 60) + raw[8:]}
    for name, offsets in (("beyond", [0, 1 << 40]), ("shape", [0, 8])):
        h = json.dumps({**header, "w": {**header["w"], "data_offsets": offsets}}).encode()
        cases[name] = struct.pack("<Q", len(h)) + h + raw[8 + n:]
    for name, data in cases.items():
        path.write_bytes(data)
        with pytest.raises(ck.CheckpointError, match="not a valid safetensors file"):
            ck.read_safetensors(path)


@pytest.mark.parametrize("content", ["nan", "list", "dict", "empty", "range"])
def test_bad_palette_files_are_refused(tmp_path, content):
    path = tmp_path / ("p.npy" if content in ("nan", "empty", "range") else "p.json")
    if content == "nan":
        np.save(path, np.full((16, 3), np.nan, np.float32))
    elif content == "range":
        np.save(path, np.full((16, 3), 3.0, np.float32))
    elif content == "empty":
        path.write_bytes(b"")
    else:
        path.write_text("[1, 2, 3]" if content == "list" else '{"clusters": {"a": 1}}')
    with pytest.raises(ValueError, match="palette"):
        load_palette(path)
    with pytest.raises(ValueError, match="finite"):
        Palette(np.full((4, 3), np.nan))


def test_a_decompression_bomb_image_is_refused(tmp_path):
    (tmp_path / "a").mkdir()
    Image.new("RGB", (10000, 9000)).save(tmp_path / "a" / "big.png")  # 90M pixels, tiny on disk
    Image.new("RGB", (8, 8)).save(tmp_path / "a" / "small.png")
    with pytest.raises(DataError, match="more pixels than an image may safely have"):
        load_dataset(str(tmp_path), res=8)


# ---- 4. settings are checked when read, wherever they come from ---------------------------------
@pytest.mark.parametrize("flag,value", [("--steps", "0"), ("--lr", "nan"), ("--lr", "-1"), ("--lr", "inf"),
                                        ("--time-budget", "-1"), ("--threads", "0"),
                                        ("--palette-size", "100000"), ("--batch-size", "0")])
def test_bad_flags_end_in_one_line_before_any_work(tmp_path, flag, value):
    t = time.time()
    r = script("train.py", flag, value, "--out", tmp_path / "o")
    assert flag in one_line_error(r) and not (tmp_path / "o").exists()
    assert time.time() - t < 60


def test_settings_from_a_crafted_checkpoint_are_checked_too(folder, tmp_path):
    out = tmp_path / "crafted"
    Trainer(config(folder, out), **QUIET).train(on_step=stop_at(2))
    arrays = ck.load_arrays(out / "ckpt.npz")
    stored = json.loads(str(arrays["config"]))
    stored["meta"]["run"]["mask_rate"] = 7.0
    ck.save_arrays(out / "ckpt.npz", {**arrays, "config": np.array(json.dumps(stored))})
    with pytest.raises(ConfigError, match="--mask-rate 7.0 is not valid"):
        resolve_config({"out": str(out)}, resume=True)


def test_a_checkpoint_from_before_augment_had_names_still_resumes(folder, tmp_path):
    """Runs saved augment as true/false; they resume as "wrn"/"none", and the flag that says the same
    thing (--no-augment on a run saved with false) is not taken for a change."""
    out = tmp_path / "legacy"
    Trainer(config(folder, out, augment="none"), **QUIET).train(on_step=stop_at(2))
    arrays = ck.load_arrays(out / "ckpt.npz")
    stored = json.loads(str(arrays["config"]))
    stored["meta"]["run"]["augment"] = False
    ck.save_arrays(out / "ckpt.npz", {**arrays, "config": np.array(json.dumps(stored))})
    assert resolve_config({"out": str(out)}, resume=True).augment == "none"
    assert resolve_config({"out": str(out), "augment": "none"}, resume=True).augment == "none"
    with pytest.raises(ConfigError, match="trained with --augment none, not wrn"):
        resolve_config({"out": str(out), "augment": "wrn"}, resume=True)
    del stored["meta"]["run"]["pool_layer"]   # a setting added after the checkpoint was written
    ck.save_arrays(out / "ckpt.npz", {**arrays, "config": np.array(json.dumps(stored))})
    assert resolve_config({"out": str(out), "pool_layer": None}, resume=True).pool_layer is None
    with pytest.raises(ConfigError, match="trained without --pool-layer, not 2 3"):
        resolve_config({"out": str(out), "pool_layer": [2, 3]}, resume=True)
    stored["meta"]["run"]["pool_layer"] = 1   # one layer, as written before --pool-layer took several
    ck.save_arrays(out / "ckpt.npz", {**arrays, "config": np.array(json.dumps(stored))})
    assert resolve_config({"out": str(out), "pool_layer": [1]}, resume=True).pool_layer == [1]
    with pytest.raises(ConfigError, match="trained with --pool-layer 1, not 1 2"):
        resolve_config({"out": str(out), "pool_layer": [1, 2]}, resume=True)


def test_a_resolution_the_memory_cannot_serve_is_refused_before_allocating(tmp_path):
    r = script("train.py", "--res", "1000", "--out", tmp_path / "o")
    assert "GiB available" in one_line_error(r)


# ---- 5. disk faults: nothing saved is lost ---------------------------------------------------------
def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one(folder, tmp_path, monkeypatch):
    out = tmp_path / "full"
    Trainer(config(folder, out), **QUIET).train(on_step=stop_at(2))
    good = (out / "ckpt.npz").read_bytes()
    real_savez = np.savez

    def savez_then_full(f, **arrays):
        real_savez(f, **dict(list(arrays.items())[:2]))      # part of the file is written ...
        raise OSError(errno.ENOSPC, "No space left on device")  # ... then the disk is full

    run = Trainer(resolve_config({"out": str(out)}, True), resume=True, **QUIET)
    monkeypatch.setattr(np, "savez", savez_then_full)
    with pytest.raises(WriteError, match="No space left on device.*ckpt.npz is intact"):
        run.train()
    assert (out / "ckpt.npz").read_bytes() == good
    assert not list(out.glob("*.tmp"))


def test_an_unwritable_out_or_cache_dir_is_found_before_the_data_is_loaded(folder, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    for key, flag in (("out", "--out"), ("cache_dir", "--cache-dir")):
        cfg = dataclasses.replace(config(folder, tmp_path / "w"), **{key: str(blocker / "sub")})
        with pytest.raises(WriteError, match=f"choose a writable {flag}"):
            Trainer(cfg, **QUIET)


def mounted_tmpfs(path, options):
    path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    if r.returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    return path


def test_a_real_full_disk_and_a_read_only_folder_end_in_one_line(folder, tmp_path):
    tiny = mounted_tmpfs(tmp_path / "tiny", "size=150k")
    readonly = mounted_tmpfs(tmp_path / "ro", "size=1m,ro")
    try:
        common = ["--size", "nano", "--res", "8", "--palette-size", "16", "--batch-size", "4", "--steps", "3",
                  "--data", folder, "--samples", "0"]
        r = script("train.py", *common, "--out", tiny / "run", "--cache-dir", tmp_path / "cache")
        assert "No space left on device" in one_line_error(r)
        assert not list((tiny / "run").glob("*.tmp"))
        r = script("train.py", *common, "--out", readonly / "run", "--cache-dir", tmp_path / "cache")
        assert "Read-only file system" in one_line_error(r) and "--out" in r.stderr
    finally:
        subprocess.run(["umount", str(tiny)])
        subprocess.run(["umount", str(readonly)])


# ---- 6. leftovers of a killed writer ----------------------------------------------------------------
def test_a_run_removes_the_temporary_files_a_killed_writer_left(folder, tmp_path):
    out = tmp_path / "left"
    Trainer(config(folder, out), **QUIET).train(on_step=stop_at(2))
    for name in ("ckpt.npz.k1lled.tmp", "snapshots/step0000003.npz.x.tmp"):
        (out / name).parent.mkdir(exist_ok=True)
        (out / name).write_bytes(b"\0" * 1000)
    lines = []
    Trainer(resolve_config({"out": str(out)}, True), resume=True, log=lines.append)
    assert not list(out.rglob("*.tmp")) and any("removed 2 temporary" in line for line in lines)


def test_kills_at_random_moments_never_cost_the_checkpoint(folder, tmp_path):
    """SIGKILL a run that checkpoints continuously, three times at different moments; each time the
    checkpoint loads and the run resumes from it."""
    out = tmp_path / "kill"
    args = [sys.executable, str(REPO / "train.py"), "--size", "nano", "--res", "8", "--palette-size", "16",
            "--batch-size", "4", "--steps", "100000", "--data", str(folder), "--out", str(out),
            "--cache-dir", str(tmp_path / "cache"), "--ckpt-every", "0.0005", "--log-every", "1"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    steps = []
    for i, delay in enumerate((0.7, 1.3, 0.4)):
        proc = subprocess.Popen(args + (["--resume"] if i else []), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, env=env)
        deadline = time.time() + 120
        while time.time() < deadline and checkpoint_step(out) <= (steps[-1] if steps else 0):
            time.sleep(0.05)                                  # until it has saved progress of its own
        time.sleep(delay)
        proc.kill()
        proc.wait(timeout=30)
        steps.append(meta_of(out / "ckpt.npz")["step"])      # loads: intact
    assert steps == sorted(steps) and steps[-1] > 0
    r = Trainer(resolve_config({"out": str(out), "steps": steps[-1] + 2}, True), resume=True, **QUIET)
    assert r.step == steps[-1] and r.train() == "done"


def checkpoint_step(out) -> int:
    """The step of the checkpoint in out, 0 when there is none yet."""
    try:
        return meta_of(out / "ckpt.npz")["step"]
    except ck.CheckpointError:
        return 0


# ---- 7. a torn last line in metrics.jsonl ---------------------------------------------------------
def test_a_torn_metrics_line_does_not_stop_a_resume(folder, tmp_path):
    out = tmp_path / "torn"
    Trainer(config(folder, out), **QUIET).train(on_step=stop_at(2))
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "kind": "tr')                    # a crash mid-write
    run = Trainer(resolve_config({"out": str(out)}, True), resume=True, **QUIET)
    assert run.train() == "done"
    for line in (out / "metrics.jsonl").read_text().splitlines():
        json.loads(line)


# ---- 8. no written path comes from a checkpoint ----------------------------------------------------
def test_a_checkpoint_cannot_choose_where_a_run_writes(folder, tmp_path):
    out = tmp_path / "paths"
    Trainer(config(folder, out), **QUIET).train(on_step=stop_at(2))
    arrays = ck.load_arrays(out / "ckpt.npz")
    stored = json.loads(str(arrays["config"]))
    stored["meta"]["run"].update(cache_dir=str(tmp_path / "elsewhere"), out=str(tmp_path / "other"))
    ck.save_arrays(out / "ckpt.npz", {**arrays, "config": np.array(json.dumps(stored))})
    cfg = resolve_config({"out": str(out)}, resume=True)
    assert cfg.out == str(out) and cfg.cache_dir == RunConfig().cache_dir
    finetune = resolve_config({"finetune": str(out / "ckpt.npz")}, resume=False)
    assert finetune.cache_dir == RunConfig().cache_dir


# ---- 9. data integrity --------------------------------------------------------------------------------
def test_a_cifar_file_cut_at_a_record_boundary_is_refused(tmp_path):
    write_cifar10(tmp_path, 20, test=False)
    with pytest.raises(DataError, match="holds 20 images where the official file has 10000"):
        load_dataset("cifar10", tmp_path)


def test_checksum_files_beside_the_data_are_verified(tmp_path):
    folder = write_cifar10(tmp_path, 20, test=False)[0]
    sums = [f"{files.file_digest(folder / f'data_batch_{i}.bin')}  data_batch_{i}.bin" for i in range(1, 6)]
    (folder / "SHA256SUMS").write_text("\n".join(sums) + "\n")
    assert len(load_dataset("cifar10", tmp_path, official=False).train) == 90
    raw = bytearray((folder / "data_batch_3.bin").read_bytes())
    raw[5000] ^= 1
    (folder / "data_batch_3.bin").write_bytes(bytes(raw))
    with pytest.raises(DataError, match="data_batch_3.bin does not match its sha256 checksum"):
        load_dataset("cifar10", tmp_path, official=False)


# ---- 10. small or uneven data ----------------------------------------------------------------------
def test_tiny_and_uneven_image_folders(tmp_path):
    (tmp_path / "one" / "a").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "one" / "a" / "0.png")
    with pytest.raises(DataError, match="at least 2"):
        load_dataset(str(tmp_path / "one"), res=8)
    Image.new("RGB", (8, 8), "red").save(tmp_path / "one" / "a" / "1.png")
    ds = load_dataset(str(tmp_path / "one"), res=8)
    assert len(ds.train) == 1 and len(ds.val) == 1
    for split, classes in (("train", "ab"), ("test", "a")):                  # test/ lacks class b
        for c in classes:
            (tmp_path / "uneven" / split / c).mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(tmp_path / "uneven" / split / c / f"{i}.png")
    ds = load_dataset(str(tmp_path / "uneven"), res=8)
    assert ds.classes == ["a", "b"] and len(ds.test) == 3 and set(ds.test.labels) == {0}


# ---- the second pass (issue #29): links, values read from files and flags, silent wrong results ----
def test_no_program_writes_through_a_planted_symbolic_link(folder, tmp_path):
    """A run folder's .lock, metrics.jsonl and probe.json, each a link to a file elsewhere: the run
    and the probe refuse in one line, and the file the link points at is untouched."""
    out = tmp_path / "links"
    Trainer(config(folder, out, steps=3), **QUIET).train()
    target = tmp_path / "elsewhere.txt"
    for name in (".lock", "metrics.jsonl"):
        target.write_text("keep me\n")
        moved = out / f"{name}.real"
        (out / name).rename(moved)
        (out / name).symlink_to(target)
        with pytest.raises((WriteError, ConfigError), match=str(out / name).replace(".", r"\.")):
            Trainer(resolve_config({"out": str(out), "steps": 5}, True), resume=True, **QUIET).train()
        assert target.read_text() == "keep me\n", name
        (out / name).unlink()
        moved.rename(out / name)
    (out / "probe.json").symlink_to(target)
    r = script("probe.py", "--ckpt", out / "ckpt.npz", "--cache-dir", tmp_path / "cache", "--no-baselines",
               "--eval-split", "val")
    assert "probe.json is a symbolic link" in one_line_error(r) and target.read_text() == "keep me\n"


def test_a_full_disk_names_the_file_and_leaves_the_earlier_one_whole(tmp_path, monkeypatch):
    from minigpt_img.plots import save_png
    png = tmp_path / "probe.png"
    save_png(np.zeros((4, 4, 3), np.uint8), png)
    before = png.read_bytes()

    def full(self, fp, *a, **kw):
        fp.write(b"x" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(Image.Image, "save", full)
    with pytest.raises(WriteError, match=f"cannot write {png}.*No space left.*probe.png is intact"):
        save_png(np.ones((4, 4, 3), np.uint8), png)
    assert png.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["probe.png"]


def test_non_finite_weights_are_refused_when_loaded(tmp_path):
    from minigpt_img.model import GPTConfig, ImageGPT
    model = ImageGPT(GPTConfig(n_layer=1, n_embd=8, n_head=2, n_px=2, vocab=4), np.random.default_rng(0))
    model.transformer.h[0].mlp.c_fc.weight.data[0, 0] = np.nan
    ck.save_model(tmp_path / "nan.npz", model, np.zeros((4, 3), np.float32))
    with pytest.raises(ck.CheckpointError, match="non-finite weights.*c_fc"):
        ck.load_model(tmp_path / "nan.npz")
    ck.export_hf(model, tmp_path / "hf", np.zeros((4, 3), np.float32))
    with pytest.raises(ck.CheckpointError, match="non-finite weights"):
        ck.load_hf(tmp_path / "hf")
    r = script("sample.py", "--ckpt", tmp_path / "nan.npz", "--out", tmp_path / "s.png")
    assert "non-finite weights" in one_line_error(r) and not (tmp_path / "s.png").exists()


def test_image_folders_read_what_they_hold(tmp_path):
    """16-bit greyscale is scaled, not clipped to white; float pixels are refused; images of
    different sizes are all read at the smallest (not refused against the first one's size); an
    empty class folder, a non-regular file and an empty --data are refused in one line."""
    root = tmp_path / "mixed"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
    grey16 = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)                     # up to 63,000
    Image.fromarray(grey16).save(root / "a" / "deep.png")
    Image.new("RGB", (12, 12), (10, 20, 30)).save(root / "a" / "big.png")
    Image.new("RGB", (8, 8), (200, 0, 0)).save(root / "b" / "small.png")
    Image.new("RGB", (10, 10), (0, 200, 0)).save(root / "b" / "mid.png")
    ds = load_dataset(str(root), seed=0, val_fraction=0.0)
    assert ds.train.images.shape[1:] == (8, 8, 3)
    deep = next(im for im in ds.train.images[ds.train.labels == 0] if im[..., 0].std() > 0)
    assert deep.max() <= 245 and deep.min() == 0 and (deep == 255).mean() < 0.05     # not white
    np.testing.assert_array_equal(deep[..., 0], np.round(grey16 / 257).astype(np.uint8))
    Image.fromarray(np.full((8, 8), 0.5, np.float32)).save(root / "b" / "float.tiff")
    with pytest.raises(DataError, match="floating-point pixels"):
        load_dataset(str(root))
    (root / "b" / "float.tiff").unlink()
    (root / "empty").mkdir()
    with pytest.raises(DataError, match="empty.*holds no images"):
        load_dataset(str(root))
    (root / "empty").rmdir()
    os.mkfifo(root / "a" / "pipe.png")
    with pytest.raises(DataError, match="pipe.png is not a regular file"):
        load_dataset(str(root))
    r = script("train.py", "--data", "", "--out", tmp_path / "o")
    assert "--data names no data set" in one_line_error(r)
    os.mkfifo(tmp_path / "palette.npy")
    r = script("train.py", "--palette", tmp_path / "palette.npy", "--out", tmp_path / "o", timeout=120)
    assert "not a regular file" in one_line_error(r)


def test_more_values_from_flags_end_in_one_line(folder, tmp_path):
    r = script("train.py", "--threads", "100000", "--out", tmp_path / "o")
    assert "--threads" in one_line_error(r) and "from 1 to 1024" in r.stderr
    out = tmp_path / "p"
    Trainer(config(folder, out, steps=2), **QUIET).train()
    r = script("probe.py", "--ckpt", out / "ckpt.npz", "--max-train", "1", "--eval-split", "val",
               "--cache-dir", tmp_path / "cache")
    assert "a probe needs at least 10" in one_line_error(r)
    r = script("probe.py", "--ckpt", out / "ckpt.npz", "--layers", "7", "--eval-split", "val",
               "--cache-dir", tmp_path / "cache")
    assert "--layers 7" in one_line_error(r) and "layers 0..2" in r.stderr and "features" not in r.stdout
    r = script("sample.py", "--ckpt", out / "ckpt.npz", "--n", "400000000", "--out", tmp_path / "s.png")
    assert "ask for fewer with --n" in one_line_error(r) and "GiB" in r.stderr
    weird = tmp_path / "new\nerror: forged"
    r = script("probe.py", "--ckpt", weird)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "\\nerror: forged" in r.stderr


def test_crafted_checkpoint_and_hf_values_are_refused(folder, tmp_path):
    """One check of what a checkpoint, a Hugging Face folder and a safetensors header may hold,
    before anything is built from it: each crafted value is one CheckpointError (or ConfigError on
    resume), never a traceback or silently shifted weights."""
    from minigpt_img.model import GPTConfig, ImageGPT
    model = ImageGPT(GPTConfig(n_layer=2, n_embd=8, n_head=2, n_px=2, vocab=4), np.random.default_rng(0))
    ck.save_model(tmp_path / "good.npz", model, np.zeros((4, 3), np.float32))
    arrays = ck.load_arrays(tmp_path / "good.npz")
    stored = json.loads(str(arrays["config"]))

    def crafted(change):
        s = json.loads(json.dumps(stored))
        change(s)
        ck.save_arrays(tmp_path / "bad.npz", {**arrays, "config": np.array(json.dumps(s))})
        return tmp_path / "bad.npz"
    for change, words in ((lambda s: s.update(meta=[1]), "JSON objects"),
                          (lambda s: s["config"].update(n_layer=2.5), "whole numbers"),
                          (lambda s: s["config"].update(n_layer=2.0), "whole numbers"),
                          (lambda s: s["config"].update(bias="yes"), "true or false")):
        with pytest.raises(ck.CheckpointError, match=words):
            ck.load_model(crafted(change))
    ck.save_model(tmp_path / "short.npz", model, np.zeros((3, 3), np.float32))
    with pytest.raises(ck.CheckpointError, match="palette"):
        ck.load_model(tmp_path / "short.npz")
    out = tmp_path / "run"
    Trainer(config(folder, out, steps=2), **QUIET).train()
    run_arrays = ck.load_arrays(out / "ckpt.npz")
    s = json.loads(str(run_arrays["config"]))
    s["meta"]["best"] = {"score": "high", "step": 1, "evals_since": 0}
    ck.save_arrays(out / "ckpt.npz", {**run_arrays, "config": np.array(json.dumps(s))})
    with pytest.raises(ConfigError, match="a best score of 'high'"):
        Trainer(resolve_config({"out": str(out), "steps": 4}, True), resume=True, **QUIET)

    ck.export_hf(model, tmp_path / "hf", np.zeros((4, 3), np.float32))
    config_json = json.loads((tmp_path / "hf" / "config.json").read_text())
    for key, value, words in (("layer_norm_epsilon", "1e-5", "not a number"), ("n_positions", 10 ** 400, "2\\^32"),
                              ("n_inner", 3.5, "not a whole number")):
        (tmp_path / "hf" / "config.json").write_text(json.dumps({**config_json, key: value}))
        with pytest.raises(ck.CheckpointError, match=words):
            ck.load_hf(tmp_path / "hf")
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config_json))
    tensors = ck.read_safetensors(tmp_path / "hf" / "model.safetensors")
    path = tmp_path / "hf" / "model.safetensors"
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    names = [k for k in header if k != "__metadata__"]
    floats = json.loads(json.dumps(header))
    floats[names[0]]["data_offsets"] = [float(v) for v in floats[names[0]]["data_offsets"]]
    overlap = json.loads(json.dumps(header))
    a, b = sorted(names, key=lambda k: header[k]["data_offsets"][0])[:2]
    size = header[b]["data_offsets"][1] - header[b]["data_offsets"][0]
    overlap[b]["data_offsets"] = [header[a]["data_offsets"][0], header[a]["data_offsets"][0] + size]  # inside a
    for bad, words in ((floats, "whole numbers"), (overlap, "overlap")):
        text = json.dumps(bad).encode()
        text += b" " * (-len(text) % 8)
        path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])
        with pytest.raises(ck.CheckpointError, match=words):
            ck.read_safetensors(path)
    assert tensors


def test_a_fine_tune_killed_at_random_moments_ends_as_one_never_stopped(folder, tmp_path):
    """SIGKILL a fine-tune with early stopping (checkpointing every step) three times at different
    moments and resume it each time: it stops at the step an uninterrupted one stops at, with the
    same best.npz, final weights and finetune.json."""
    pre = tmp_path / "pre"
    Trainer(config(folder, pre, steps=4), **QUIET).train()
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def fine_tune(out, *extra):
        return [sys.executable, str(REPO / "train.py"), "--finetune", str(pre / "ckpt.npz"), "--out", str(out),
                "--cache-dir", str(tmp_path / "cache"), "--steps", "400", "--eval-every", "3", "--patience", "4",
                "--eval-images", "8", "--log-every", "1", "--threads", "1", *extra]
    r = subprocess.run(fine_tune(tmp_path / "a"), capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0 and "early stop" in r.stdout, r.stderr[-2000:]
    final = meta_of(tmp_path / "a" / "ckpt.npz")["step"]
    assert final < 400
    out, steps = tmp_path / "b", []
    for i, delay in enumerate((0.3, 0.7, 0.5)):
        proc = subprocess.Popen(fine_tune(out, "--ckpt-every", "0.0005", *(["--resume"] if i else [])),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None and checkpoint_step(out) <= (steps[-1] if steps else 0):
            time.sleep(0.02)
        time.sleep(delay)
        proc.kill()
        proc.wait(timeout=30)
        steps.append(checkpoint_step(out))
    r = subprocess.run(fine_tune(out, "--resume"), capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert meta_of(out / "ckpt.npz")["step"] == final and steps == sorted(steps)
    for name in ("ckpt.npz", "best.npz"):
        a, b = ck.load_arrays(tmp_path / "a" / name), ck.load_arrays(out / name)
        assert all(np.array_equal(a[k], b[k]) for k in a if k.startswith(("model/", "head/"))), name
    assert json.loads((tmp_path / "a" / "finetune.json").read_text()) == json.loads((out / "finetune.json").read_text())
