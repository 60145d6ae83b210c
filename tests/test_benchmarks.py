"""The benchmarks measure what they say: the paper's model with its 512-colour vocabulary (the
default data has two colours), and FLOP counts that match the model's shapes."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from bench_trainer import bench_trainer  # noqa: E402
from step_profile import OpTimer  # noqa: E402


@pytest.fixture(scope="module")
def trainer():
    return bench_trainer("nano", 8, 2)


def test_the_benchmarked_model_has_the_papers_vocabulary(trainer):
    assert trainer.model.config.vocab == 512  # as torch_ref's model, built from config_for


def test_the_profile_counts_attention_flops_of_the_whole_width(trainer):
    cfg = trainer.model.config
    timer = OpTimer()
    timer.install(trainer)
    try:
        trainer.optimizer_step(3e-4)
    finally:
        timer.remove()
    B, T, C, L = 2, cfg.n_ctx, cfg.n_embd, cfg.n_layer
    # causal: half of QK^T and of PV, 2 FLOPs per multiply-add; the backward twice the forward
    assert timer.flops[("attention", "forward")] == pytest.approx(L * 2 * B * T * T * C)
    assert timer.flops[("attention", "backward")] == pytest.approx(L * 4 * B * T * T * C)
