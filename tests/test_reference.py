"""The one-page reference forward pass (reference.py) against the model and Hugging Face's logits,
and the package's layers: no module imports one above its own."""
import ast
from pathlib import Path

import numpy as np
import pytest

from minigpt_img import checkpoint as ck
from minigpt_img import reference
from minigpt_img.model import GPTConfig, ImageGPT

REPO = Path(__file__).resolve().parent.parent
FIXTURE = REPO / "tests" / "fixtures" / "hf_tiny"


@pytest.mark.parametrize("causal", [True, False])
def test_reference_forward_equals_the_model(causal):
    cfg = GPTConfig(n_layer=3, n_embd=24, n_head=3, n_px=9, vocab=10)  # T = 81: more than one tile
    rng = np.random.default_rng(0)
    m = ImageGPT(cfg, rng, dtype=np.float64)
    for p in m.parameters():  # away from the zero head and unit norms, so every path counts
        p.data = p.data + rng.standard_normal(p.shape) * 0.1
    x = rng.integers(0, cfg.vocab + 1, (2, cfg.n_ctx))
    logits, feats = m.forward_features(x, causal=causal)
    ref_logits, ref_feats = reference.forward(m.state_dict(), x, cfg.n_head, causal=causal)
    np.testing.assert_allclose(ref_logits, logits.data, rtol=1e-10, atol=1e-12)
    assert len(ref_feats) == len(feats) == cfg.n_layer + 1
    for a, b in zip(ref_feats, feats):
        np.testing.assert_allclose(a, b.data, rtol=1e-10, atol=1e-12)


def test_reference_forward_equals_hugging_face_logits():
    """With the biases the Hugging Face fixture carries (transformers computed its logits)."""
    model, _ = ck.load_hf(FIXTURE, dtype=np.float64)
    x = np.load(FIXTURE / "input_ids.npy")
    logits, _ = reference.forward(model.state_dict(), x, model.config.n_head)
    np.testing.assert_allclose(logits, np.load(FIXTURE / "expected_logits.npy"), rtol=0, atol=1e-6)


# ---- layers ------------------------------------------------------------------------------------
# file helpers < engine < model < method < scripts; a module may import its own layer and those below.
LAYERS = {
    "files": 0, "streams": 0, "threads": 0, "plots": 0, "parallel": 0,
    "tensor": 1, "ops": 1, "kernels": 1, "attention": 1,
    "nn": 2, "model": 2, "sizes": 2, "reference": 2,
    "objectives": 3, "optim": 3, "data": 3, "shapes": 3, "streaks": 3, "download": 3, "palette": 3, "checkpoint": 3,
    "runconfig": 3, "run_data": 3, "run_folder": 3, "trainer": 3, "finetune": 3, "linear_probe": 3,
    "sampling": 3,
    "cli": 4,
}


def package_imports(path: Path) -> set:
    """The minigpt_img modules a file imports, at any depth of its code (lazy imports count)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:
                found |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
            elif node.module and node.module.startswith("minigpt_img"):
                parts = node.module.split(".")
                found |= {parts[1]} if len(parts) > 1 else {a.name for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("minigpt_img.")}
    return found - {"tensor"} if path.stem == "__init__" else found


def test_every_module_has_a_layer():
    modules = {p.stem for p in (REPO / "minigpt_img").glob("*.py")} - {"__init__"}
    assert modules == set(LAYERS), f"give these a layer: {modules ^ set(LAYERS)}"


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_no_module_imports_a_layer_above_its_own(name):
    above = {m for m in package_imports(REPO / "minigpt_img" / f"{name}.py") if LAYERS[m] > LAYERS[name]}
    assert not above, f"{name} (layer {LAYERS[name]}) imports {above} from a higher layer"


def test_the_layer_check_sees_a_planted_upward_import(tmp_path):
    planted = tmp_path / "kernels.py"
    planted.write_text("def f():\n    from .trainer import Trainer\n    from minigpt_img.model import ImageGPT\n")
    assert package_imports(planted) == {"trainer", "model"}


def test_scripts_set_threads_before_numpy_loads():
    """The scripts' helpers import nothing that loads NumPy (and so its BLAS) before the thread
    settings are applied; under mpiexec the cores are divided among the processes of a machine."""
    import os
    import subprocess
    import sys
    code = ("import sys, minigpt_img.cli, minigpt_img.threads as t; print('numpy' in sys.modules, "
            "t.default_threads())")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert r.stdout.split() == ["False", str(max(1, (os.cpu_count() or 1) // 2))], r.stderr
