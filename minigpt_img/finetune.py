"""§2.3 Fine-tuning: the pre-trained model with a classifier, trained on both objectives.

Legend: B batch, T positions, C width, K classes.

    f     = (1/T) sum_t n^L_t                 average-pooled final norm output, (B, C)
    l     = f W_clf                           class logits, (B, K); W_clf starts at zero, no bias
                                              (released iGPT: `wclf` initialised with stddev 0)
    L_CLF = cross-entropy(l, y)
    L     = L_GEN + L_CLF                     (--clf-only: L_CLF alone, the paper's comparison)

L_GEN is the objective the model was pre-trained with (AR or BERT, objectives.py), on the same batch.
As in the paper: the same Adam, the augmentation of §3.1 (reflection pad 4, random crop, flip), a
learning rate about 10x below pre-training's, a linear warm-up then a constant rate (no cosine decay),
and early stopping on validation accuracy with the best checkpoint kept (best.npz). At the end the
best checkpoint is scored on the test set (the validation split when no test set is present).

The head is named `score`, as in Hugging Face's ImageGPTForImageClassification (which also pools by
averaging).
"""
from __future__ import annotations

import json

import numpy as np
from tqdm import tqdm

from . import checkpoint as ck
from . import nn, ops
from .data import cached_tokens
from .objectives import generative_loss
from .tensor import no_grad
from .trainer import Pretraining


class FineTuning(Pretraining):
    kind = "finetune"

    def __init__(self, cfg, resume: bool = False, log=print):
        super().__init__(cfg, resume=resume, log=log, init_from=None if resume else cfg.finetune)
        self.decay = "constant"
        self.best_path = self.out / "best.npz"
        self.val_labels = self.ds.val.labels[:cfg.eval_images]
        self.best_acc, self.evals_since_best = -1.0, 0
        if resume and self.best_path.exists():
            _, meta = ck.read_meta(self.best_path)
            self.best_acc = meta.get("val_acc", -1.0)

    def make_heads(self, rng) -> dict:
        # released iGPT: the classifier starts at zero, so fine-tuning starts from the pre-trained loss
        return {"score": nn.Linear(self.model.config.n_embd, len(self.ds.classes), rng, std=0.0)}

    def forward(self, x: np.ndarray, rng):
        """-> (L_GEN, class logits (B, K)) for tokens x (B, T)."""
        gen, feats = generative_loss(self.model, x, self.cfg.objective, self.cfg.mask_rate, rng,
                                     features=True)
        pooled = ops.mean(feats[-1], axis=1)                                   # (B, C)
        return gen, self.heads["score"](pooled)                                # (B, K)

    def loss(self, x, y, rng):
        gen, clf_logits = self.forward(x, rng)
        clf = ops.cross_entropy(clf_logits, y)
        return clf if self.cfg.clf_only else gen + clf

    def accuracy(self, tokens: np.ndarray, labels: np.ndarray, batch_size: int = 64,
                 progress: bool = False) -> dict:
        rng = np.random.default_rng([self.cfg.seed, 7919])
        correct, gen_total, clf_total = 0, 0.0, 0.0
        with no_grad():
            for s in tqdm(range(0, len(tokens), batch_size), desc="scoring", unit="batch",
                          disable=not progress, leave=False):
                x, y = tokens[s:s + batch_size].astype(np.int64), labels[s:s + batch_size]
                gen, clf_logits = self.forward(x, rng)
                correct += int(np.sum(clf_logits.data.argmax(axis=1) == y))
                gen_total += gen.item() * len(x)
                clf_total += ops.cross_entropy(clf_logits, y).item() * len(x)
        n = max(len(tokens), 1)
        return {"acc": correct / n, "gen_loss": gen_total / n, "clf_loss": clf_total / n,
                "loss": (0.0 if self.cfg.clf_only else gen_total / n) + clf_total / n}

    def evaluate(self, batch_size: int = 64) -> dict:
        return self.accuracy(self.val_tokens, self.val_labels, batch_size)

    def describe_eval(self, m: dict) -> str:
        return (f"step {self.step}: val accuracy {m['acc']:.2%} (L_CLF {m['clf_loss']:.4f}, "
                f"L_GEN {m['gen_loss']:.4f} nats/token)")

    def after_eval(self, m: dict) -> None:
        if m["acc"] > self.best_acc:
            self.best_acc, self.evals_since_best = m["acc"], 0
            self.save(self.best_path, val_acc=m["acc"])
        else:
            self.evals_since_best += 1
            if self.evals_since_best >= self.cfg.patience:
                self.stop_reason = "early stop"
                self.log(f"early stop: no better validation accuracy in {self.cfg.patience} evaluations")

    def finish(self) -> None:
        """Score the best checkpoint on the test set (or the validation split) and record it."""
        if self.stop_reason == "time budget" or not self.best_path.exists():
            self.after_eval(self.evaluate())  # the weights since the last evaluation count too
        self._load_weights(ck.load_arrays(self.best_path), self.best_path, heads=True)
        split, name = (self.ds.test, "test") if self.ds.test is not None else (self.ds.val, "validation")
        tokens = cached_tokens(split.images, self.palette, self.cfg.cache_dir)
        result = self.accuracy(tokens, split.labels, progress=True)
        self.log(f"best checkpoint (val accuracy {self.best_acc:.2%}): {name} accuracy "
                 f"{result['acc']:.2%} on {len(split)} images")
        summary = {"best_val_acc": self.best_acc, "eval_split": name, "eval_acc": result["acc"],
                   "n_eval": len(split), "clf_only": self.cfg.clf_only, "steps": self.step}
        (self.out / "finetune.json").write_text(json.dumps(summary, indent=2))
