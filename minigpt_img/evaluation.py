"""§3.4 Evaluation during a run: the held-out score, the best checkpoint, early stopping, and the
results a run ends with.

Every --eval-every steps the task's metrics (tasks.py) are measured on the run's evaluation images
(runconfig.Plan: validation images, or held-out training images when the validation split stands in
for a missing test set). For a task with a score (fine-tuning's accuracy), the best checkpoint is kept
as best.npz and the run stops after --patience evaluations without a better one (§3.4: "early stop
once we reach the maximum validation accuracy"; §4.5: "we employ early stopping based on validation
accuracy"). Both the best score and the count since it are saved in every checkpoint, so a resumed
run stops where an uninterrupted one would.

A run that ends as planned writes its results: samples.png when pre-training (sampling.py), the best
checkpoint scored on the test set when fine-tuning (finetune.json, accuracy.png).

Evaluation is a part of trainer.Trainer (a base class of it): it reads the Trainer's cfg, plan, data,
model, task, comm, folder, step, best and stop_reason, and calls its save and load_weights.
"""
from __future__ import annotations

import time

import numpy as np

from . import checkpoint as ck
from .data import cached_tokens
from .files import write_json
from .objectives import NATS_TO_BITS, draw_mask
from .parallel import average, batches
from .plots import image_grid, save_png, with_caption
from .runconfig import EVAL_BATCH
from .sizes import passes
from .sampling import generate
from .streams import generator
from .tensor import no_grad


class Evaluation:
    """The evaluations of a run and its results: a base class of trainer.Trainer (module docstring)."""

    def measure(self, tokens: np.ndarray, labels: np.ndarray, batch_size: int = EVAL_BATCH,
                desc: str = "evaluating"):
        """The task's metrics over the images (tokens, labels), the batches shared among the ranks
        (BERT: batch b's mask from generator(seed, "eval", b), the same at every evaluation and for any
        number of ranks), each through forward passes of sizes.images_per_pass images at most. None
        when a Ctrl-C interrupted it."""
        sums = np.zeros(self.task.n_sums)
        with no_grad():
            for b, rows in batches(len(tokens), batch_size, self.comm, desc,
                                   stop=lambda: self.stop_reason == "interrupted"):
                x, y = tokens[rows].astype(np.int64), labels[rows]
                mask = draw_mask(self.cfg.objective, x.shape, self.cfg.mask_rate,
                                 generator(self.cfg.seed, "eval", b))
                for p in passes(len(x), self.model.config):            # at most images_per_pass at once
                    sums += self.task.sums(self.model, x[p], y[p], None if mask is None else mask[p])
        means = average(sums, len(tokens), self.comm)
        return None if self.stop_reason == "interrupted" else self.task.metrics(means)

    def evaluate(self, metrics=None, write=None) -> dict | None:
        """Evaluate at this step, record it, keep a snapshot (--snapshots), and, for a task with a
        score, keep the best checkpoint (best.npz) and stop after --patience evaluations without a
        better one."""
        m = self.measure(self.data.val_tokens, self.data.val_labels)
        if m is None:  # interrupted during the evaluation: nothing to record
            return None
        if self.comm.is_root and metrics is not None:
            self.folder.write(metrics, self.step, kind="eval", **m, elapsed_s=time.time() - self._t0)
        (write or self.log)(self.describe(m))
        if self.cfg.snapshots:
            self.save(self.folder.snapshot(self.step), weights_only=True, val_loss=m["loss"])
        if self.task.score is not None:
            best = self.best
            if best["score"] is None or m[self.task.score] > best["score"]:
                best.update(score=m[self.task.score], step=self.step, evals_since=0)
                self.save(self.folder.best, weights_only=True, val_acc=m[self.task.score])
            else:
                best["evals_since"] += 1
                if best["evals_since"] >= self.cfg.patience:
                    self.log(f"early stop: no better {self.plan.eval_on} accuracy in {self.cfg.patience} evaluations")
                    self.stop_reason = "early stop"
        return m

    def describe(self, m: dict) -> str:
        """One line of the log for an evaluation's metrics m."""
        if self.task.score is None:
            return (f"step {self.step}: val loss {m['loss']:.4f} nats/token ({m['loss'] * NATS_TO_BITS:.3f} "
                    f"bits), unigram {self.data.entropy:.3f}")
        best = max(m["acc"], self.best["score"] if self.best["score"] is not None else -1.0)
        return (f"step {self.step}: accuracy {m['acc']:.2%} on {len(self.data.val_tokens)} {self.plan.eval_on} "
                f"images (best so far {best:.2%}; L_CLF {m['clf_loss']:.4f}, L_GEN {m['gen_loss']:.4f} nats/token)")

    def score_best(self) -> None:
        """Fine-tuning's result: the best checkpoint scored on the test set (or, when the data has
        none, on the validation split, which then chose nothing) -> finetune.json, accuracy.png.
        When the time budget ended the run between evaluations, the weights since the last one
        count too: they are measured, and scored instead when better, from memory (they are
        ckpt.npz's). Neither a best.npz of an evaluation nor the best score in the checkpoint changes,
        so a resumed run goes on from the evaluations an uninterrupted one made."""
        chosen, best_acc, best_step = self.folder.best, self.best["score"], self.best["step"]
        m = {}
        if self.stop_reason == "time budget" or not self.folder.best.exists():
            m = self.measure(self.data.val_tokens, self.data.val_labels)
            if m is not None:
                self.log(self.describe(m))
                if best_acc is None or m[self.task.score] > best_acc:
                    chosen, best_acc, best_step = self.folder.ckpt, m[self.task.score], self.step
                if not self.folder.best.exists():  # no evaluation yet: a resumed run's first one replaces it
                    self.save(self.folder.best, weights_only=True, val_acc=best_acc)
                    chosen = self.folder.best
        if m is not None and chosen == self.folder.best:
            self.load_weights(ck.load_arrays(self.folder.best), self.folder.best, heads=True)
        ds = self.data.ds
        split, name = (ds.test, "test") if ds.test is not None else (ds.val, "validation")
        tokens = cached_tokens(split.images, self.data.palette, self.cfg.cache_dir)
        result = None if m is None else self.measure(tokens, split.labels, desc="scoring")
        if result is None:
            self.log(f"scoring interrupted: no finetune.json; {self.folder.best} holds the best weights")
            return
        self.log(f"best checkpoint, {chosen.name} ({self.plan.eval_on} accuracy {best_acc:.2%}): {name} accuracy "
                 f"{result['acc']:.2%} on {len(split)} images")
        if self.comm.is_root:
            write_json(self.folder.path / "finetune.json", {
                "best_acc": best_acc, "best_step": best_step, "best_file": chosen.name, "chosen_on": self.plan.eval_on,
                "eval_split": name, "eval_acc": result["acc"], "n_eval": len(split), "clf_only": self.cfg.clf_only,
                "pool_layer": list(self.plan.pool_layers), "head_from_probe": self.cfg.head_from_probe,
                "steps": self.step})
            self.folder.plot_accuracy(f"fine-tuning {self.cfg.size} on {self.cfg.data}: accuracy on "
                                      f"{self.plan.eval_on} images", 100 / len(ds.classes), self.plan.eval_on)

    def draw_samples(self) -> None:
        """Pre-training's result: samples.png, images sampled from the model (AR only: BERT has no
        raster-order sampler)."""
        cfg = self.cfg
        if cfg.objective != "ar":
            self.log("no samples.png: a BERT model has no raster-order sampler")
            return
        if cfg.samples < 1 or not self.comm.is_root:
            return
        tokens = generate(self.model, cfg.samples, generator(cfg.seed, "samples"), progress=True,
                          should_stop=lambda: self.stop_reason == "interrupted")
        if tokens is None:
            self.log("sampling interrupted: no samples.png (the checkpoint was saved before)")
            return
        grid = with_caption(image_grid(self.data.palette.decode(tokens), ncols=8, scale=max(1, 96 // cfg.res)),
                            [f"{cfg.samples} samples from {cfg.size} after {self.step} steps on {cfg.data}",
                             f"{cfg.res}x{cfg.res}, temperature 1"])
        save_png(grid, self.folder.path / "samples.png")
