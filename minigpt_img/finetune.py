"""§2.3 Fine-tuning: the pre-trained model with a classifier, trained on both objectives.

Legend: B batch, T positions, C width, K classes.

    f     = (1/T) sum_t n^L_t                 average-pooled final norm output, (B, C)
                                              (--pool-layer l: n^l instead, the probe's features;
                                              --pool-layer l1 l2 ..: [f^l1, f^l2, ..], (B, k C), the
                                              probe's --concat)
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

--head-from-probe (departure: linear probing, then fine-tuning, "LP-FT", Kumar et al. 2022, "Fine-
Tuning can Distort Pretrained Features and Underperform Out-of-Distribution") starts the classifier
from the linear probe of linear_probe.py instead of zero: the probe is fitted on the pooled features
of the training images as they are, and its standardisation folded into the head, which then has a
bias:

    l = ((f - mu) / sigma) W + b = f (W / sigma) + (b - (mu / sigma) W)

so fine-tuning starts from the probe's accuracy, and the first steps' gradients reach the network
through a classifier that already separates the classes rather than through a zero one. The start
is evaluated like any later step and is kept as best.npz unless fine-tuning does better. lambda is
the strongest within one standard error of the best on a held-out tenth of the training images
(linear_probe.fit_probe, one_se), not the best alone: the weights of a nearly unregularised probe
are large (on CIFAR-10 here ~700x the norm a zero-started head reaches), which makes every step's
change of the features swing the logits; measured in the README.

The head is named `score`, as in Hugging Face's ImageGPTForImageClassification (which also pools by
averaging).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from . import checkpoint as ck
from . import nn, ops
from .data import cached_tokens
from .files import file_digest
from .linear_probe import cached_features, fit_probe
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
        n_layer = run.model.config.n_layer
        self.pool_layers = [n_layer] if self.cfg.pool_layer is None else list(self.cfg.pool_layer)
        if max(self.pool_layers) > n_layer:
            raise ConfigError(f"--pool-layer {max(self.pool_layers)}: {self.cfg.size} has layers 0 to "
                              f"{n_layer} (0: the embeddings, {n_layer}: the final norm's output)")
        # released iGPT: the classifier starts at zero (no bias), so fine-tuning starts from the
        # pre-trained loss; --head-from-probe: from a probe, with a bias (start())
        self.heads = {"score": nn.Linear(len(self.pool_layers) * run.model.config.n_embd,
                                         len(run.data.ds.classes), generator(self.cfg.seed, "heads"),
                                         std=0.0, bias=self.cfg.head_from_probe)}
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
        pooled = [ops.mean(feats[l], axis=1) for l in self.pool_layers]        # each (B, C)
        f = pooled[0] if len(pooled) == 1 else ops.concat(pooled, axis=1)      # (B, k C)
        return gen, self.heads["score"](f)                                     # (B, K)

    def start(self) -> None:
        """Once the pre-trained weights are in (a new run, not a resumed one): --head-from-probe
        starts the classifier from a linear probe (the module docstring). Its features are cached
        in --cache-dir, keyed by the pre-trained checkpoint and the training tokens."""
        if not self.cfg.head_from_probe:
            return
        run, cfg, head = self.run, self.cfg, self.heads["score"]
        tokens, labels = run.data.train_tokens, run.data.ds.train.labels                 # (N, T), (N,)
        stem = (Path(cfg.cache_dir) / "features" /
                f"finetune-{file_digest(cfg.finetune)[:16]}-{run.data.data_hash}-{cfg.objective}")
        F, _ = cached_features(stem, run.model, tokens, run.comm, objective=cfg.objective,
                               mask_rate=cfg.mask_rate, seed=cfg.seed, desc="probe features",
                               fair_share=run.fair_share)                                 # (N, L+1, C)
        F = F[:, self.pool_layers].reshape(len(F), -1)                                    # (N, k C)
        A, c = np.zeros(head.weight.shape), np.zeros(head.bias.shape)
        if run.comm.is_root:  # one fit, sent to every rank: their heads must be the same
            probe, lam, acc = fit_probe(F, labels, len(run.data.ds.classes), cfg.seed, one_se=True)
            A, c = probe.raw_weights()
            run.log(f"classifier started from a linear probe on layers {self.pool_layers} of {len(F)} "
                    f"training images (lambda {lam:g}, {acc:.2%} on a tenth of them held out)")
        head.weight.data[...] = run.comm.broadcast(np.ascontiguousarray(A))
        head.bias.data[...] = run.comm.broadcast(np.ascontiguousarray(c))
        m = self.evaluate()
        run.log(f"{self.describe(m)} before fine-tuning")
        self.after_eval(m)

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
                   "pool_layer": self.pool_layers, "head_from_probe": self.cfg.head_from_probe,
                   "steps": run.step}
        if run.comm.is_root:
            (run.folder.path / "finetune.json").write_text(json.dumps(summary, indent=2))
            run.folder.plot_accuracy(f"fine-tuning {self.cfg.size} on {self.cfg.data}: accuracy on "
                                     f"{run.data.eval_name} images", 100 / len(ds.classes), run.data.eval_name)
