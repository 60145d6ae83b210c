"""What a run trains: the generative objective alone (§2.1), or a classifier beside it (§2.3).

Legend: B batch, T positions, C width, K classes, k pooled layers.

A task is a small object over the model; it holds no run state. The Trainer (trainer.py) calls

    task.heads                             {name: Module} trained beside the model (head/<name>/... in
                                           the checkpoint)
    task.loss(model, x, y, mask)           the scalar loss Tensor of tokens x (B, T), labels y (B,),
                                           BERT's input mask (or None)
    task.sums(model, x, y, mask)           what an evaluation adds up over one batch (task.n_sums
                                           numbers; no gradient)
    task.metrics(means)                    {"loss": ..., ...} from those sums averaged over the images
    task.score                             the metric that chooses the best checkpoint (None: none is
                                           chosen) and stops the run early (--patience)

Pre-training (§2.1) minimises L_GEN, which is L_AR or L_BERT (objectives.py). Fine-tuning (§2.3):

    f     = (1/T) sum_t n^L_t          the paper's f^L = <n^L_i>_i, average-pooled final norm, (B, C)
                                       (--pool-layer l1 l2 ..: [f^l1, f^l2, ..], (B, k C): departure)
    l     = f W_clf                    class logits, (B, K); W_clf starts at zero, no bias (released
                                       iGPT: `wclf` initialised with stddev 0; §3.3: "zero-initialize
                                       all projections producing logits")
    L_CLF = cross-entropy(l, y)
    L     = L_GEN + L_CLF              §2.3: "the joint objective L_GEN + L_CLF ... works even better"
                                       (--clf-only: L_CLF alone)

The head is named `score`, as in Hugging Face's ImageGPTForImageClassification (which also pools by
averaging).
"""
from __future__ import annotations

import numpy as np

from . import nn, ops
from .objectives import generative_loss
from .streams import generator


class Pretraining:
    """§2.1: L_AR or L_BERT alone."""

    kind = "pretrain"
    score = None  # no checkpoint is chosen: the last one is the result
    n_sums = 1    # what sums() returns: the loss summed over the batch

    def __init__(self, objective: str):
        self.objective, self.heads = objective, {}

    def loss(self, model, x: np.ndarray, y, mask):
        return generative_loss(model, x, self.objective, mask=mask)

    def sums(self, model, x, y, mask) -> list:
        return [self.loss(model, x, y, mask).item() * len(x)]

    def metrics(self, means) -> dict:
        """{"loss": the validation loss in nats per token (BERT: per masked token)}."""
        return {"loss": float(means[0])}


class FineTuning:
    """§2.3: a linear classifier on pooled features, trained with the model on L_GEN + L_CLF. The
    pooled layers are the Plan's: n^L as the paper, or --pool-layer's (departure)."""

    kind = "finetune"
    score = "acc"  # §3.4: "early stop once we reach the maximum validation accuracy"
    n_sums = 3     # correct, L_GEN, L_CLF

    def __init__(self, objective: str, width: int, n_classes: int, pool_layers: tuple, seed: int,
                 clf_only: bool = False, head_bias: bool = False):
        """width: the model's C; head_bias: a classifier with a bias (started from a probe)."""
        self.objective, self.pool_layers, self.clf_only = objective, tuple(pool_layers), clf_only
        self.heads = {"score": nn.Linear(len(self.pool_layers) * width, n_classes,
                                         generator(seed, "heads"), std=0.0, bias=head_bias)}

    def forward(self, model, x: np.ndarray, mask):
        """-> (L_GEN, class logits (B, K)) for tokens x (B, T) (mask: BERT's input mask, or None)."""
        gen, feats = generative_loss(model, x, self.objective, mask=mask, features=True)
        pooled = [ops.mean(feats[l], axis=1) for l in self.pool_layers]       # each (B, C)
        f = pooled[0] if len(pooled) == 1 else ops.concat(pooled, axis=1)     # (B, k C)
        return gen, self.heads["score"](f)                                    # (B, K)

    def loss(self, model, x, y, mask):
        gen, logits = self.forward(model, x, mask)
        clf = ops.cross_entropy(logits, y)
        return clf if self.clf_only else gen + clf

    def sums(self, model, x, y, mask) -> list:
        """[correct, L_GEN, L_CLF], each summed over the batch's images."""
        gen, logits = self.forward(model, x, mask)
        return [np.sum(logits.data.argmax(axis=1) == y), gen.item() * len(x),
                ops.cross_entropy(logits, y).item() * len(x)]

    def metrics(self, means) -> dict:
        acc, gen, clf = (float(v) for v in means)
        return {"acc": acc, "gen_loss": gen, "clf_loss": clf, "loss": (0.0 if self.clf_only else gen) + clf}
