"""The one-page reference forward pass (reference.py) against the model and Hugging Face's logits,
and the package's layers: no module imports one above its own."""
import ast
from pathlib import Path

import numpy as np
import pytest

from minigpt_img import checkpoint as ck
from minigpt_img import reference
from minigpt_img.model import GPTConfig, ImageGPT
from minigpt_img.objectives import model_inputs

REPO = Path(__file__).resolve().parent.parent
FIXTURE = REPO / "tests" / "fixtures" / "hf_tiny"


@pytest.mark.parametrize("objective", ["ar", "bert"])
def test_reference_forward_equals_the_model(objective):
    """The page's SOS shift and BERT masking included: from an image's tokens to the logits that
    predict them, as objectives.model_inputs and ImageGPT compute them."""
    cfg = GPTConfig(n_layer=3, n_embd=24, n_head=3, n_px=9, vocab=10)  # T = 81: more than one tile
    rng = np.random.default_rng(0)
    m = ImageGPT(cfg, rng, dtype=np.float64)
    for p in m.parameters():  # away from the zero head and unit norms, so every path counts
        p.data = p.data + rng.standard_normal(p.shape) * 0.1
    x = rng.integers(0, cfg.vocab, (2, cfg.n_ctx))
    inputs, causal, mask = model_inputs(x, cfg.sos, objective, 0.3, np.random.default_rng(1))
    logits, feats = m.forward_features(inputs, causal, mask)
    ref_logits, ref_feats = reference.forward(m.state_dict(), x, cfg.n_head, objective, mask)
    np.testing.assert_allclose(ref_logits, logits.data, rtol=1e-10, atol=1e-12)
    assert len(ref_feats) == len(feats) == cfg.n_layer + 1
    for a, b in zip(ref_feats, feats):
        np.testing.assert_allclose(a, b.data, rtol=1e-10, atol=1e-12)
    if objective == "bert":  # the mask hides the token embeddings only: the positions still count
        state = m.state_dict()
        state["transformer.wpe.weight"] = state["transformer.wpe.weight"] * 0
        assert not np.allclose(reference.forward(state, x, cfg.n_head, objective, mask)[0], ref_logits)


def test_reference_forward_equals_hugging_face_logits():
    """With the biases the Hugging Face fixture carries (transformers computed its logits on
    input_ids, which begin with SOS: the page's shift reads the image tokens after it)."""
    model, _ = ck.load_hf(FIXTURE, dtype=np.float64)
    ids = np.load(FIXTURE / "input_ids.npy")                                  # (B, T), ids[:, 0] = SOS
    assert (ids[:, 0] == model.config.sos).all()
    x = np.concatenate([ids[:, 1:], np.zeros((len(ids), 1), ids.dtype)], axis=1)  # the last is never read
    logits, _ = reference.forward(model.state_dict(), x, model.config.n_head)
    np.testing.assert_allclose(logits, np.load(FIXTURE / "expected_logits.npy"), rtol=0, atol=1e-6)


# ---- layers ------------------------------------------------------------------------------------
# file helpers < engine < model < method (data and palette < objectives, optimiser, checkpoints, probe
# maths, sampling, tasks) < the run's orchestration (settings < a run's data and folder < evaluation
# < the loop < what runs a trained model: fine-tuning's start, the probe report) < scripts. A module
# may import its own layer and those below.
LAYERS = {
    "errors": 0, "ranges": 0, "files": 0, "torchfile": 0, "streams": 0, "threads": 0, "plots": 0, "parallel": 0,
    "tensor": 1, "ops": 1, "jit": 1, "exp_kernels": 1, "kernels": 1, "attention": 1, "palette_kernels": 1,
    "decode_kernels": 1,
    "nn": 2, "model": 2, "sizes": 2, "reference": 2,
    "data": 3, "shapes": 3, "streaks": 3, "download": 3, "palette": 3,
    "objectives": 4, "optim": 4, "hub": 4, "checkpoint": 4, "features": 4, "probe_fit": 4, "sampling": 4, "tasks": 4,
    "runconfig": 5, "run_folder": 5,
    "run_data": 6, "forecast": 6,
    "evaluation": 7,
    "trainer": 8,
    "finetune": 9, "probe_report": 9,
    "cli": 10,
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


def upward_imports(name: str, path: Path) -> set:
    """The modules that `path`, standing for module `name`, imports from a layer above name's."""
    return {m for m in package_imports(path) if LAYERS[m] > LAYERS[name]}


def test_every_module_has_a_layer():
    modules = {p.stem for p in (REPO / "minigpt_img").glob("*.py")} - {"__init__"}
    assert modules == set(LAYERS), f"give these a layer: {modules ^ set(LAYERS)}"


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_no_module_imports_a_layer_above_its_own(name):
    above = upward_imports(name, REPO / "minigpt_img" / f"{name}.py")
    assert not above, f"{name} (layer {LAYERS[name]}) imports {above} from a higher layer"


def test_the_layer_check_sees_a_planted_upward_import(tmp_path):
    planted = tmp_path / "kernels.py"
    planted.write_text("def f():\n    from .trainer import Trainer\n    from minigpt_img.model import ImageGPT\n")
    assert package_imports(planted) == {"trainer", "model"}
    assert upward_imports("kernels", planted) == {"trainer", "model"}  # the engine is below both
    # inside the method and orchestration layers too: the loop may not reach up to fine-tuning or
    # the probe report, nor a task up to the run's settings
    trainer = tmp_path / "trainer.py"
    trainer.write_text((REPO / "minigpt_img" / "trainer.py").read_text() + "\nfrom .finetune import start_from_probe\n")
    assert upward_imports("trainer", trainer) == {"finetune"}
    tasks = tmp_path / "tasks.py"
    tasks.write_text("from .runconfig import RunConfig\nfrom .objectives import generative_loss\n")
    assert upward_imports("tasks", tasks) == {"runconfig"}


def test_the_loop_imports_neither_fine_tuning_nor_the_probe():
    imported = package_imports(REPO / "minigpt_img" / "trainer.py")
    assert not imported & {"finetune", "probe_report", "probe_fit", "features"}, imported


def test_scripts_set_threads_before_numpy_loads():
    """The scripts' helpers and flags (the settings' declarations included) load neither NumPy (and
    so its BLAS) nor numba before the thread settings are applied; under mpiexec the cores are
    divided among the processes of a machine."""
    import os
    import subprocess
    import sys
    code = ("import sys; sys.path.insert(0, %r); import minigpt_img.cli, minigpt_img.threads as t, train, probe, "
            "sample; train.parse(['--size', 's']); probe.parse([]); sample.parse([]); "
            "print('numpy' in sys.modules or 'numba' in sys.modules, t.default_threads())" % str(REPO))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert r.stdout.split() == ["False", str(max(1, (os.cpu_count() or 1) // 2))], r.stderr
