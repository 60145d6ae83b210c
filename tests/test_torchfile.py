"""pytorch_model.bin read without torch (torchfile.py): archives built here by hand in torch.save's
format, crafted ones refused with nothing run, and (when torch and transformers are installed) a
file transformers wrote giving transformers' logits."""
import importlib.util
import io
import os
import pickle
import subprocess
import sys
import types
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest

from minigpt_img import checkpoint as ck
from minigpt_img.errors import CheckpointError
from minigpt_img.model import GPTConfig, ImageGPT
from minigpt_img.torchfile import read_torch_state

HAS_TRANSFORMERS = all(importlib.util.find_spec(m) for m in ("torch", "transformers"))
LIMIT = 1 << 30
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def fake_torch(monkeypatch):
    """Stand-ins registered as torch and torch._utils, so that pickle writes the globals torch.save
    writes (GLOBAL 'torch FloatStorage', 'torch._utils _rebuild_tensor_v2') without torch."""
    torch, utils = types.ModuleType("torch"), types.ModuleType("torch._utils")
    for name in ("FloatStorage", "HalfStorage", "BoolStorage", "LongStorage"):
        setattr(torch, name, type(name, (), {"__module__": "torch"}))

    def _rebuild_tensor_v2(*args):
        raise AssertionError("never called while pickling")
    _rebuild_tensor_v2.__module__ = "torch._utils"
    _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
    utils._rebuild_tensor_v2 = _rebuild_tensor_v2
    torch._utils = utils
    monkeypatch.setitem(sys.modules, "torch", torch)
    monkeypatch.setitem(sys.modules, "torch._utils", utils)
    return torch


class Storage:
    def __init__(self, kind, key, array):
        self.kind, self.key, self.array = kind, key, array


class Tensor:
    def __init__(self, storage, offset, size, stride):
        self.args = (storage, offset, size, stride, False, OrderedDict())

    def __reduce__(self):
        return sys.modules["torch._utils"]._rebuild_tensor_v2, self.args


class Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, Storage):
            return ("storage", getattr(sys.modules["torch"], obj.kind), obj.key, "cpu", obj.array.size)
        return None


def write_archive(path, state, storages, *, compress=zipfile.ZIP_STORED, extra=None):
    """A zip laid out as torch.save lays it out: archive/data.pkl and archive/data/<key>."""
    buf = io.BytesIO()
    Pickler(buf, protocol=2).dump(state)
    with zipfile.ZipFile(path, "w", compression=compress) as z:
        z.writestr("archive/data.pkl", buf.getvalue())
        for s in storages:
            z.writestr(f"archive/data/{s.key}", s.array.tobytes())
        z.writestr("archive/version", "3\n")
        for name, data in (extra or {}).items():
            z.writestr(name, data)
    return path


def test_a_hand_built_state_dict_reads_with_its_views(fake_torch, tmp_path):
    w = Storage("FloatStorage", "0", np.arange(12, dtype="<f4"))
    h = Storage("HalfStorage", "1", np.array([0.5, -2.0], dtype="<f2"))
    mask = Storage("BoolStorage", "2", np.array([True, False, True]))
    state = OrderedDict([("w", Tensor(w, 0, (3, 4), (4, 1))),
                         ("wT", Tensor(w, 0, (4, 3), (1, 4))),            # a transposed view of the same storage
                         ("tail", Tensor(w, 8, (4,), (1,))),
                         ("h", Tensor(h, 0, (2,), (1,))), ("mask", Tensor(mask, 0, (3,), (1,)))])
    out = read_torch_state(write_archive(tmp_path / "ok.bin", state, [w, h, mask]), LIMIT)
    np.testing.assert_array_equal(out["w"], np.arange(12).reshape(3, 4))
    np.testing.assert_array_equal(out["wT"], np.arange(12).reshape(3, 4).T)
    np.testing.assert_array_equal(out["tail"], [8, 9, 10, 11])
    assert out["h"].dtype == np.float16 and out["h"].tolist() == [0.5, -2.0]
    assert out["mask"].tolist() == [True, False, True]


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os
        return os.system, (f"touch {self.marker}",)


def test_crafted_archives_are_refused_and_nothing_runs(fake_torch, tmp_path):
    marker = tmp_path / "ran"
    w = Storage("FloatStorage", "0", np.arange(4, dtype="<f4"))
    good = OrderedDict([("w", Tensor(w, 0, (4,), (1,)))])
    cases = {
        "a pickle that calls os.system": (OrderedDict([("w", Payload(marker))]), [w], {}),
        "an unknown global": (OrderedDict([("w", print)]), [w], {}),
        "a view beyond its storage": (OrderedDict([("w", Tensor(w, 2, (4,), (1,)))]), [w], {}),
        "a negative stride": (OrderedDict([("w", Tensor(w, 0, (4,), (-1,)))]), [w], {}),
        "a storage whose bytes are missing": (good, [], {}),
        "a storage of the wrong length": (good, [Storage("FloatStorage", "0", np.arange(3, dtype="<f4"))], {}),
        "not a dict of tensors": ([1, 2], [], {}),
    }
    for what, (state, storages, kw) in cases.items():
        path = write_archive(tmp_path / "bad.bin", state, storages, **kw)
        with pytest.raises(CheckpointError, match="not a usable pytorch_model.bin"):
            read_torch_state(path, LIMIT)
        assert not marker.exists(), what
    ok = write_archive(tmp_path / "ok.bin", good, [w])
    data = ok.read_bytes()
    (tmp_path / "cut.bin").write_bytes(data[: len(data) // 2])                        # truncated
    with pytest.raises(CheckpointError, match="BadZipFile"):
        read_torch_state(tmp_path / "cut.bin", LIMIT)
    bomb = write_archive(tmp_path / "bomb.bin", good, [w], compress=zipfile.ZIP_DEFLATED,
                         extra={"archive/data/9": b"\0" * (64 << 20)})              # 64 MiB in a few KB
    assert bomb.stat().st_size < 1 << 20
    with pytest.raises(CheckpointError, match="more than the"):
        read_torch_state(bomb, 32 << 20)
    with pytest.raises(CheckpointError, match="compressed members"):
        read_torch_state(bomb, LIMIT)


@pytest.mark.skipif(not HAS_TRANSFORMERS, reason="optional: needs torch and transformers")
def test_a_pytorch_model_bin_written_by_transformers_gives_its_logits(tmp_path):
    """A transformers model's state dict saved by torch.save as pytorch_model.bin beside its
    config.json (the released models' format; transformers 5 writes safetensors only), read without
    torch's unpickler: the same logits as transformers, through load_hf and so every entry point."""
    import torch
    sys.path.insert(0, str(Path(__file__).parent / "fixtures"))
    from make_hf_fixture import build_random_hf_model, hf_logits
    hf = build_random_hf_model(seed=5, n_layer=2, n_embd=32, n_head=4, n_px=4, vocab=12)
    hf.save_pretrained(tmp_path / "bin")
    (tmp_path / "bin" / "model.safetensors").unlink()
    torch.save(hf.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    ours, _ = ck.load_hf(tmp_path / "bin")
    x = np.random.default_rng(1).integers(0, 12, (3, 16))
    x[:, 0] = ours.config.sos
    np.testing.assert_allclose(ours(x).data, hf_logits(hf, x), rtol=0, atol=1e-5)


PEAK_OF_A_LOAD = """
import sys
from minigpt_img.checkpoint import open_model
def kib(key):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key))
open("/proc/self/clear_refs", "w").write("5")   # the peak (VmHWM) starts again from here
before = kib("VmRSS:")
model = open_model(sys.argv[1])[0]
print((kib("VmHWM:") - before) * 1024 / (4 * model.num_parameters()))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="measures memory through Linux's /proc")
def test_loading_a_model_holds_its_weights_once(fake_torch, tmp_path):
    """iGPT-L is 5.4 GB in float32: a loader that drew random weights first, kept a file's bytes
    beside their copies, or copied the arrays into the model would need two or three times that.
    From each format (our .npz, model.safetensors, pytorch_model.bin) the peak memory of a load
    stays close to the weights' own size."""
    import shutil
    cfg = GPTConfig(n_layer=4, n_embd=512, n_head=8, n_px=8, vocab=16)       # 12.7M parameters, 51 MB
    model = ImageGPT(cfg, np.random.default_rng(0))
    ck.save_model(tmp_path / "ckpt.npz", model)
    ck.export_hf(model, tmp_path / "st")
    (tmp_path / "bin").mkdir()
    shutil.copy(tmp_path / "st" / "config.json", tmp_path / "bin")
    tensors = ck.read_safetensors(tmp_path / "st" / "model.safetensors")
    storages = [Storage("FloatStorage", str(i), v.ravel()) for i, v in enumerate(tensors.values())]
    state = OrderedDict((k, Tensor(s, 0, v.shape, tuple(int(st) // 4 for st in v.strides)))
                        for (k, v), s in zip(tensors.items(), storages))
    write_archive(tmp_path / "bin" / "pytorch_model.bin", state, storages)
    del tensors, storages, state
    for source in ("ckpt.npz", "st", "bin"):
        r = subprocess.run([sys.executable, "-c", PEAK_OF_A_LOAD, str(tmp_path / source)], capture_output=True,
                           text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
        assert r.returncode == 0, r.stderr
        assert float(r.stdout) < 1.4, f"{source}: a load's peak is {float(r.stdout):.2f} x the weights"
