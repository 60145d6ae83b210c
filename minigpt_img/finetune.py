"""§2.3 Fine-tuning, the step before training that --head-from-probe adds.

Fine-tuning itself is the FineTuning task (tasks.py) trained by the Trainer (trainer.py), as in
the paper: the same Adam (§3.4: "we use the same batch size and Adam hyperparameters"), the
augmentation the paper uses when fine-tuning on CIFAR (§3.1: "the augmentation popularized by Wide
Residual Networks"; data.augment; none on streaks, whose diagonal classes a flip swaps), a learning
rate 10x below pre-training's (§4.5: "often an order of magnitude smaller"), a constant rate after
a linear warm-up (§3.4: "we do not employ a cosine schedule"; the warm-up is a departure, the paper
names none when fine-tuning), and early stopping on held-out accuracy with the best checkpoint kept.

--head-from-probe (departure: linear probing, then fine-tuning, "LP-FT", Kumar et al. 2022, "Fine-
Tuning can Distort Pretrained Features and Underperform Out-of-Distribution") starts the classifier
from the linear probe of probe_fit.py instead of zero, before the first step: the probe is fitted on
the pooled features of the training images as they are, and its standardisation folded into the
head, which then has a bias:

    l = ((f - mu) / sigma) W + b = f (W / sigma) + (b - (mu / sigma) W)

so fine-tuning starts from the probe's accuracy, and the first steps' gradients reach the network
through a classifier that already separates the classes rather than through a zero one. The start
is evaluated like any later step and is kept as best.npz unless fine-tuning does better. lambda is
the strongest within one standard error of the best on a held-out tenth of the training images
(probe_fit.fit_probe, one_se), not the best alone: the weights of a nearly unregularised probe are
large (on CIFAR-10 here ~700x the norm a zero-started head reaches), which makes every step's change
of the features swing the logits; measured in docs/results.md.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .features import cached_features, side_by_side
from .checkpoint import model_digest
from .hub import locate
from .probe_fit import fit_probe
from .runconfig import EVAL_BATCH


def start_from_probe(run) -> None:
    """Departure (LP-FT, the module docstring): start the classifier of a new fine-tuning run (a
    trainer.Trainer whose pre-trained weights are in) from a linear probe of its pooled training
    features, then evaluate that start. The
    features are cached in --cache-dir, keyed by the pre-trained checkpoint and the training tokens."""
    cfg, head, comm = run.cfg, run.task.heads["score"], run.comm
    tokens, labels = run.data.train_tokens, run.data.ds.train.labels                     # (N, T), (N,)
    stem = (Path(cfg.cache_dir) / "features" /
            f"finetune-{model_digest(locate(cfg.finetune))[:16]}-{run.data.data_hash}-{cfg.objective}")
    F, _ = cached_features(stem, run.model, tokens, comm, objective=cfg.objective, batch_size=EVAL_BATCH,
                           mask_rate=cfg.mask_rate, seed=cfg.seed, desc="probe features",
                           fair_share=run.fair_share)                                     # (N, L+1, C)
    F = side_by_side(F, run.plan.pool_layers)                                             # (N, k C)
    A, c = np.zeros(head.weight.shape), np.zeros(head.bias.shape)
    if comm.is_root:  # one fit, sent to every rank: their heads must be the same
        probe, lam, acc = fit_probe(F, labels, len(run.data.ds.classes), cfg.seed, one_se=True)
        A, c = probe.raw_weights()
        run.log(f"classifier started from a linear probe on layers {list(run.plan.pool_layers)} of {len(F)} "
                f"training images (lambda {lam:g}, {acc:.2%} on a tenth of them held out)")
    head.weight.data[...] = comm.broadcast(np.ascontiguousarray(A))
    head.bias.data[...] = comm.broadcast(np.ascontiguousarray(c))
    run.evaluate()
