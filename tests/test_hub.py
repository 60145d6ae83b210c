"""A model named as hub.py says: a checkpoint, a Hugging Face folder, or a hub name found in the
standard Hugging Face cache (built here in its real layout) and otherwise fetched; every entry point
(sample, probe, fine-tune) takes all three."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from minigpt_img import checkpoint as ck
from minigpt_img.errors import CheckpointError
from minigpt_img.model import GPTConfig, ImageGPT
from minigpt_img.runconfig import resolve_config
from minigpt_img.trainer import Trainer

from helpers import write_image_folder

REPO = Path(__file__).resolve().parent.parent
NANO = GPTConfig(n_layer=2, n_embd=32, n_head=2, n_px=8, vocab=16)  # sizes.SIZES["nano"] at 8x8


def hf_cache(root: Path, repo="openai/imagegpt-small", commit="0123abcd" * 5, weights="model.safetensors"):
    """A Hugging Face hub cache holding repo at `main`, laid out as huggingface_hub lays it out:
    refs/main names the commit; snapshots/<commit>/ links each file to blobs/<its hash>."""
    model = ImageGPT(NANO, np.random.default_rng(0))
    for p in model.parameters():
        p.data = (p.data + np.random.default_rng(1).standard_normal(p.shape) * 0.1).astype(np.float32)
    palette = np.random.default_rng(2).uniform(-1, 1, (NANO.vocab, 3)).astype(np.float32)
    staging = root / "staging"
    ck.export_hf(model, staging, palette)
    if weights == "pytorch_model.bin":
        pytest.importorskip("torch")
        import torch
        state = {k: torch.from_numpy(v) for k, v in ck.read_safetensors(staging / "model.safetensors").items()}
        torch.save(state, staging / "pytorch_model.bin")
        (staging / "model.safetensors").unlink()
    base = root / "hub" / ("models--" + repo.replace("/", "--"))
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(commit)
    (base / "blobs").mkdir()
    (base / "snapshots" / commit).mkdir(parents=True)
    for f in staging.iterdir():
        blob = base / "blobs" / f"blob-{f.name}"
        f.rename(blob)
        (base / "snapshots" / commit / f.name).symlink_to(os.path.relpath(blob, base / "snapshots" / commit))
    return model, palette


def env(**extra):
    return {**os.environ, "PYTHONPATH": str(REPO), **extra}


def test_a_hub_name_is_found_in_the_cache_offline_by_every_entry_point(tmp_path):
    model, palette = hf_cache(tmp_path)
    cache = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, str(REPO / "sample.py"), "--init-from", "openai/imagegpt-small", "--n", "2",
                        "--out", str(tmp_path / "s.png")], capture_output=True, text=True, env=env(**cache), timeout=300)
    assert r.returncode == 0 and (tmp_path / "s.png").is_file(), r.stderr[-2000:]
    os.environ.update(cache)
    try:
        loaded, centers, meta, path = ck.open_model("openai/imagegpt-small")
        assert path.name == "0123abcd" * 5 and meta["source"] == "openai/imagegpt-small"
        x = np.random.default_rng(3).integers(0, NANO.vocab + 1, (2, NANO.n_ctx))
        np.testing.assert_allclose(loaded(x).data, model(x).data, rtol=0, atol=1e-6)
        np.testing.assert_array_equal(centers, palette)
        # fine-tuning from it: the size, resolution and palette come from its config.json
        folder = write_image_folder(tmp_path / "imgs", per_class=8, step=70)
        cfg = resolve_config({"finetune": "openai/imagegpt-small", "data": str(folder), "steps": 2,
                              "out": str(tmp_path / "ft"), "cache_dir": str(tmp_path / "cache"), "eval_images": 4})
        assert (cfg.size, cfg.res, cfg.palette_size) == ("nano", 8, 16)
        run = Trainer(cfg, log=lambda *a: None)
        np.testing.assert_allclose(run.model(x).data, model(x).data, rtol=0, atol=1e-6)
        np.testing.assert_array_equal(run.data.palette.centers, palette)
        assert run.train() == "done"
        # probing it
        r = subprocess.run([sys.executable, str(REPO / "probe.py"), "--ckpt", "openai/imagegpt-small", "--data",
                            str(folder), "--no-baselines", "--cache-dir", str(tmp_path / "cache"),
                            "--out", str(tmp_path / "probe")], capture_output=True, text=True, env=env(**cache),
                           timeout=300)
        assert r.returncode == 0 and (tmp_path / "probe" / "probe.json").is_file(), r.stderr[-2000:]
    finally:
        for k in cache:
            os.environ.pop(k)


def test_no_cache_and_no_network_or_no_extra_is_one_line(tmp_path):
    empty = {"HF_HUB_CACHE": str(tmp_path / "empty"), "HF_HUB_OFFLINE": "1"}
    args = [sys.executable, str(REPO / "sample.py"), "--init-from", "openai/imagegpt-small"]
    try:
        import huggingface_hub  # noqa: F401  (installed: the fetch path answers)
        r = subprocess.run(args, capture_output=True, text=True, env=env(**empty), timeout=300)
        assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.count("\n") == 1, r.stderr
        assert "cannot be reached (offline)" in r.stderr
    except ImportError:
        pass
    (tmp_path / "huggingface_hub").mkdir()
    (tmp_path / "huggingface_hub" / "__init__.py").write_text("raise ImportError('not installed')\n")
    r = subprocess.run(args, capture_output=True, text=True, timeout=300,
                       env={**env(**empty), "PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}"})
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert 'pip install -e ".[hub]"' in r.stderr
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        ck.open_model(tmp_path / "missing.npz")


def test_a_cached_pytorch_model_bin_loads_too(tmp_path, monkeypatch):
    model, _ = hf_cache(tmp_path, weights="pytorch_model.bin")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    loaded, _, _, path = ck.open_model("openai/imagegpt-small@main")
    assert (path / "pytorch_model.bin").is_symlink()
    x = np.random.default_rng(4).integers(0, NANO.vocab + 1, (2, NANO.n_ctx))
    np.testing.assert_allclose(loaded(x).data, model(x).data, rtol=0, atol=1e-6)
