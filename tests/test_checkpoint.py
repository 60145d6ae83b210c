"""Checkpoints: atomic .npz, safetensors, Hugging Face ImageGPT import/export (logits within 1e-6)."""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from minigpt_img import checkpoint as ck
from minigpt_img.model import GPTConfig, ImageGPT

FIXTURE = Path(__file__).parent / "fixtures" / "hf_tiny"
HAS_TRANSFORMERS = all(importlib.util.find_spec(m) for m in ("torch", "transformers"))


def small_model(bias=False, seed=0):
    cfg = GPTConfig(n_layer=2, n_embd=16, n_head=2, n_px=3, vocab=10, bias=bias)
    m = ImageGPT(cfg, np.random.default_rng(seed))
    rng = np.random.default_rng(seed + 1)
    for p in m.parameters():
        p.data = (p.data + rng.standard_normal(p.shape) * 0.2).astype(np.float32)
    return m


def tokens(cfg, B=2):
    x = np.random.default_rng(5).integers(0, cfg.vocab, (B, cfg.n_ctx))
    x[:, 0] = cfg.sos
    return x


def test_model_round_trip(tmp_path):
    m = small_model()
    palette = np.random.default_rng(0).uniform(-1, 1, (10, 3))
    ck.save_model(tmp_path / "ckpt.npz", m, palette, meta={"step": 7}, extra={"opt/t": np.array(7)})
    m2, pal2, meta, arrays = ck.load_model(tmp_path / "ckpt.npz")
    assert m2.config == m.config and meta == {"step": 7} and int(arrays["opt/t"]) == 7
    np.testing.assert_allclose(pal2, palette.astype(np.float32))
    x = tokens(m.config)
    np.testing.assert_array_equal(m(x).data, m2(x).data)


def test_interrupted_write_leaves_old_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.npz"
    ck.save_arrays(path, {"a": np.arange(3)})

    def dies_mid_write(f, **arrays):
        f.write(b"PK\x03\x04 partial")
        raise KeyboardInterrupt  # a kill while writing

    monkeypatch.setattr(np, "savez", dies_mid_write)
    with pytest.raises(KeyboardInterrupt):
        ck.save_arrays(path, {"a": np.arange(5)})
    monkeypatch.undo()
    np.testing.assert_array_equal(ck.load_arrays(path)["a"], np.arange(3))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.npz"]  # no temp file left behind


def test_written_files_get_the_usual_permissions(tmp_path):
    """Atomic writes go through a private temporary file; the result has open()'s mode, 0666 - umask."""
    import os
    umask = os.umask(0o022)
    try:
        ck.save_arrays(tmp_path / "a.npz", {"x": np.zeros(2)})
        assert (tmp_path / "a.npz").stat().st_mode & 0o777 == 0o644
    finally:
        os.umask(umask)


def test_bad_checkpoints_give_clear_errors(tmp_path):
    with pytest.raises(ck.CheckpointError, match="no checkpoint at"):
        ck.load_arrays(tmp_path / "missing.npz")
    good = tmp_path / "good.npz"
    ck.save_model(good, small_model())
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(ck.CheckpointError, match="truncated"):
        ck.load_arrays(truncated)
    ck.save_arrays(tmp_path / "foreign.npz", {"x": np.zeros(2)})
    with pytest.raises(ck.CheckpointError, match="no valid model config"):
        ck.load_model(tmp_path / "foreign.npz")


def test_safetensors_round_trip_and_bfloat16(tmp_path):
    arrays = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.array([1, -2], np.int64),
              "c": np.zeros((0, 4), np.float64)}
    ck.write_safetensors(tmp_path / "t.safetensors", arrays, {"format": "pt"})
    back = ck.read_safetensors(tmp_path / "t.safetensors")
    for k, v in arrays.items():
        assert back[k].dtype == v.dtype
        np.testing.assert_array_equal(back[k], v)
    # bfloat16 = the top half of a float32
    vals = np.array([1.0, -2.5, 3.140625], np.float32)
    raw = (vals.view(np.uint32) >> 16).astype("<u2").tobytes()
    header = json.dumps({"w": {"dtype": "BF16", "shape": [3], "data_offsets": [0, 6]}}).encode()
    (tmp_path / "bf.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + raw)
    np.testing.assert_array_equal(ck.read_safetensors(tmp_path / "bf.safetensors")["w"], vals)


def test_import_committed_hf_fixture_matches_transformers_logits():
    """The fixture's logits were computed by transformers (tests/fixtures/make_hf_fixture.py)."""
    model, palette = ck.load_hf(FIXTURE)
    assert model.config == GPTConfig(n_layer=2, n_embd=16, n_head=2, n_px=4, vocab=12, bias=True)
    assert palette.shape == (12, 3)
    x = np.load(FIXTURE / "input_ids.npy")
    np.testing.assert_allclose(model(x).data, np.load(FIXTURE / "expected_logits.npy"), rtol=0, atol=1e-6)


@pytest.mark.parametrize("bias", [False, True])
def test_export_then_import_is_identity(tmp_path, bias):
    m = small_model(bias=bias)
    palette = np.random.default_rng(0).uniform(-1, 1, (10, 3)).astype(np.float32)
    ck.export_hf(m, tmp_path, palette)
    m2, pal2 = ck.load_hf(tmp_path)
    assert m2.config == m.config
    np.testing.assert_array_equal(pal2, palette)
    x = tokens(m.config)
    np.testing.assert_array_equal(m(x).data, m2(x).data)


def test_hf_import_errors(tmp_path):
    with pytest.raises(ck.CheckpointError, match="has no config.json"):
        ck.load_hf(tmp_path)
    ck.export_hf(small_model(), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["activation_function"] = "gelu"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ck.CheckpointError, match="activation gelu"):
        ck.load_hf(tmp_path)


@pytest.mark.skipif(not HAS_TRANSFORMERS, reason="optional: needs torch and transformers")
def test_parity_with_live_transformers_both_ways(tmp_path):
    import sys
    sys.path.insert(0, str(FIXTURE.parent))
    from make_hf_fixture import build_random_hf_model, hf_logits
    from transformers import ImageGPTForCausalImageModeling

    hf = build_random_hf_model(seed=3, n_layer=3, n_embd=32, n_head=4, n_px=5, vocab=20)
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    ours, _ = ck.load_hf(tmp_path / "hf")
    x = tokens(ours.config, B=3)
    np.testing.assert_allclose(ours(x).data, hf_logits(hf, x), rtol=0, atol=1e-6)

    mine = small_model(seed=4)
    ck.export_hf(mine, tmp_path / "export")
    back = ImageGPTForCausalImageModeling.from_pretrained(tmp_path / "export").eval()
    x = tokens(mine.config)
    np.testing.assert_allclose(hf_logits(back, x), mine(x).data, rtol=0, atol=1e-6)


def test_read_meta_reads_only_the_config(tmp_path):
    ck.save_model(tmp_path / "ckpt.npz", small_model(), meta={"step": 3}, extra={"big": np.zeros(10)})
    assert ck.load_arrays(tmp_path / "ckpt.npz", keys=("config",)).keys() == {"config"}
    cfg, meta = ck.read_meta(tmp_path / "ckpt.npz")
    assert cfg == small_model().config and meta == {"step": 3}
    with pytest.raises(ck.CheckpointError, match="no checkpoint at"):
        ck.read_meta(tmp_path / "missing.npz")


def test_convert_exports_a_checkpoint_and_imports_it_back(tmp_path):
    """convert.py: checkpoint -> Hugging Face folder (palette and the box filter in the processor's
    settings) -> checkpoint again, with the same logits; an existing destination is refused."""
    import subprocess
    import sys
    repo = Path(__file__).resolve().parent.parent
    mine = small_model(seed=6)
    palette = np.random.default_rng(7).uniform(-1, 1, (mine.config.vocab, 3)).astype(np.float32)
    ck.save_model(tmp_path / "ckpt.npz", mine, palette)
    env = {"PYTHONPATH": str(repo), "PATH": "/usr/bin:/bin"}

    def convert(*args):
        return subprocess.run([sys.executable, str(repo / "convert.py"), *map(str, args)], capture_output=True,
                              text=True, env=env, timeout=300)
    r = convert(tmp_path / "ckpt.npz", tmp_path / "hf")
    assert r.returncode == 0, r.stderr
    pre = json.loads((tmp_path / "hf" / "preprocessor_config.json").read_text())
    assert pre["resample"] == ck.PIL_BOX == 4 and np.allclose(pre["clusters"], palette)
    r = convert(tmp_path / "hf", tmp_path / "back.npz")
    assert r.returncode == 0, r.stderr
    back, centers, meta, _ = ck.load_model(tmp_path / "back.npz")
    x = tokens(mine.config)
    np.testing.assert_allclose(back(x).data, mine(x).data, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(centers, palette)
    again = convert(tmp_path / "ckpt.npz", tmp_path / "hf")
    assert again.returncode == 2 and "exists" in again.stderr and "Traceback" not in again.stderr


@pytest.mark.skipif(not HAS_TRANSFORMERS, reason="optional: needs torch and transformers")
def test_transformers_image_processor_on_an_export_gives_our_tokens(tmp_path):
    """The exported preprocessor_config.json makes transformers' ImageGPTImageProcessor resize with
    the box filter and quantise with our palette: its input_ids are our tokens, on every pixel."""
    from transformers import ImageGPTImageProcessor

    from minigpt_img.data import resize
    from minigpt_img.palette import Palette
    rng = np.random.default_rng(8)
    images = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)               # CIFAR-like
    cfg = GPTConfig(n_layer=1, n_embd=16, n_head=2, n_px=16, vocab=32)
    palette = Palette(np.random.default_rng(9).uniform(-1, 1, (32, 3)).astype(np.float32))
    ck.export_hf(ImageGPT(cfg, rng), tmp_path / "hf", palette.centers)
    processor = ImageGPTImageProcessor.from_pretrained(tmp_path / "hf")
    theirs = processor(images=list(images), return_tensors="np")["input_ids"]
    ours = palette.encode(resize(images, 16))
    assert (theirs == ours).mean() == 1.0
