"""§2.3 Fine-tuning: the pre-trained model with a classifier, trained on both objectives.

Legend: B batch, T positions, C width, K classes.

    f     = (1/T) sum_t n^L_t                 average-pooled final norm output, (B, C)
                                              (--pool-layer l: n^l instead, the probe's features)
    l     = f W_clf                           class logits, (B, K); W_clf starts at zero, no bias
                                              (released iGPT: `wclf` initialised with stddev 0)
    L_CLF = cross-entropy(l, y)
    L     = L_GEN + L_CLF                     (--clf-only: L_CLF alone, the paper's comparison)

L_GEN is the objective the model was pre-trained with (AR or BERT, objectives.py), on the same batch.
As in the paper: the same Adam, the augmentation the paper uses when fine-tuning on CIFAR (that of
Wide ResNets: reflection pad 4, random crop, horizontal flip; data.augment; none on streaks, whose
diagonal classes a flip swaps), a learning rate about 10x below pre-training's, a linear warm-up then
a constant rate (no cosine decay), and early stopping on held-out accuracy with the best checkpoint
kept (best.npz). At the end the best checkpoint is scored on the test set, or, when the data has
none, on the validation split; the checkpoint is then chosen on a held-out slice of the training
images (run_data.py), so that nothing is chosen on the images that give the result.

The head is named `score`, as in Hugging Face's ImageGPTForImageClassification (which also pools by
averaging).
"""
from __future__ import annotations

import json

import numpy as np

from . import checkpoint as ck
from . import nn, ops
from .data import cached_tokens
from .objectives import generative_loss
from .runconfig import ConfigError
from .streams import generator
from .tensor import no_grad


class FineTuning:
    """The fine-tuning task of trainer.Trainer (its interface is listed in trainer.py)."""

    kind = "finetune"
    decay = "constant"  # §2.3: no cosine decay when fine-tuning

    def __init__(self, run, resume: bool):
        self.run, self.cfg = run, run.cfg
        # released iGPT: the classifier starts at zero, so fine-tuning starts from the pre-trained loss
        self.heads = {"score": nn.Linear(run.model.config.n_embd, len(run.data.ds.classes),
                                         generator(self.cfg.seed, "heads"), std=0.0)}
        n_layer = run.model.config.n_layer
        self.pool_layer = n_layer if self.cfg.pool_layer is None else self.cfg.pool_layer
        if self.pool_layer > n_layer:
            raise ConfigError(f"--pool-layer {self.pool_layer}: {self.cfg.size} has layers 0 to {n_layer} "
                              f"(0: the embeddings, {n_layer}: the final norm's output)")
        self.best_acc, self.evals_since_best = -1.0, 0
        if resume and run.folder.best.exists():
            _, meta = ck.read_meta(run.folder.best)
            self.best_acc = meta.get("val_acc", -1.0)
        what = "L_CLF" if self.cfg.clf_only else "L_GEN + L_CLF"
        self.chart = (f"fine-tuning {self.cfg.size} on {self.cfg.data} {self.cfg.res}x{self.cfg.res}: "
                      f"{what}", f"{what} (nats)", {})

    def forward(self, x: np.ndarray, mask):
        """-> (L_GEN, class logits (B, K)) for tokens x (B, T) (mask: BERT's input mask, or None)."""
        gen, feats = generative_loss(self.run.model, x, self.cfg.objective, mask=mask, features=True)
        pooled = ops.mean(feats[self.pool_layer], axis=1)                      # (B, C)
        return gen, self.heads["score"](pooled)                                # (B, K)

    def loss(self, x, y, mask):
        gen, clf_logits = self.forward(x, mask)
        clf = ops.cross_entropy(clf_logits, y)
        return clf if self.cfg.clf_only else gen + clf

    def accuracy(self, tokens: np.ndarray, labels: np.ndarray, batch_size: int = 64,
                 progress: bool = False) -> dict:
        """Accuracy, L_GEN and L_CLF over the images (shared out among the ranks under MPI)."""
        run = self.run
        sums = np.zeros(3)  # correct, L_GEN and L_CLF summed over images
        with no_grad():
            for rows, x, mask in run.eval_batches(tokens, batch_size, "scoring" if progress else "evaluating"):
                y = labels[rows]
                gen, clf_logits = self.forward(x, mask)
                sums += (np.sum(clf_logits.data.argmax(axis=1) == y), gen.item() * len(x),
                         ops.cross_entropy(clf_logits, y).item() * len(x))
        correct, gen_total, clf_total = run.comm.allreduce_sum(sums) / max(len(tokens), 1)
        return {"acc": float(correct), "gen_loss": float(gen_total), "clf_loss": float(clf_total),
                "loss": float((0.0 if self.cfg.clf_only else gen_total) + clf_total)}

    def evaluate(self, batch_size: int = 64) -> dict:
        return self.accuracy(self.run.data.val_tokens, self.run.data.val_labels, batch_size)

    def describe(self, m: dict) -> str:
        best = max(m["acc"], self.best_acc)
        data = self.run.data
        return (f"step {self.run.step}: accuracy {m['acc']:.2%} on {len(data.val_tokens)} {data.eval_name} "
                f"images (best so far {best:.2%}; L_CLF {m['clf_loss']:.4f}, L_GEN {m['gen_loss']:.4f} nats/token)")

    def after_eval(self, m: dict):
        """Keep the best checkpoint; "early stop" after `patience` evaluations without a better one."""
        if m["acc"] > self.best_acc:
            self.best_acc, self.evals_since_best = m["acc"], 0
            self.run.save(self.run.folder.best, val_acc=m["acc"])
            return None
        self.evals_since_best += 1
        if self.evals_since_best >= self.cfg.patience:
            self.run.log(f"early stop: no better {self.run.data.eval_name} accuracy in {self.cfg.patience} "
                         "evaluations")
            return "early stop"
        return None

    def finish(self) -> None:
        """Score the best checkpoint on the test set (or the validation split) and record it."""
        run = self.run
        if run.stop_reason == "time budget" or not run.folder.best.exists():
            self.after_eval(self.evaluate())  # the weights since the last evaluation count too
        run.load_weights(ck.load_arrays(run.folder.best), run.folder.best, heads=True)
        ds = run.data.ds
        split, name = (ds.test, "test") if ds.test is not None else (ds.val, "validation")
        tokens = cached_tokens(split.images, run.data.palette, self.cfg.cache_dir)
        result = self.accuracy(tokens, split.labels, progress=True)
        if run.stop_reason == "interrupted":
            run.log(f"scoring interrupted: no finetune.json; {run.folder.best} holds the best weights")
            return
        run.log(f"best checkpoint ({run.data.eval_name} accuracy {self.best_acc:.2%}): {name} accuracy "
                f"{result['acc']:.2%} on {len(split)} images")
        summary = {"best_acc": self.best_acc, "chosen_on": run.data.eval_name, "eval_split": name,
                   "eval_acc": result["acc"], "n_eval": len(split), "clf_only": self.cfg.clf_only,
                   "pool_layer": self.pool_layer, "steps": run.step}
        if run.comm.is_root:
            (run.folder.path / "finetune.json").write_text(json.dumps(summary, indent=2))
            run.folder.plot_accuracy(f"fine-tuning {self.cfg.size} on {self.cfg.data}: accuracy on "
                                     f"{run.data.eval_name} images", 100 / len(ds.classes), run.data.eval_name)
