"""§3.4 Training: the loop behind train.py, for pre-training (§2.1) and fine-tuning (§2.3).

One optimiser step at learning rate lr(step) (optim.lr_at: linear warm-up, then cosine decay to 0 for
pre-training, constant for fine-tuning):

    for each of grad_accum micro-batches x_m of batch_size images:
        grads += d(loss(x_m) / grad_accum) / d(params)        the gradients of one batch of
                                                              batch_size * grad_accum images
    grads *= min(1, clip / ||grads||)                         departure: the paper does not clip
    params = Adam(params, grads, lr(step))                    beta2 = 0.95 (optim.py)

What is trained is a *task*, an object the Trainer builds and calls; the Trainer owns everything else
(data, model, optimiser, schedule, checkpoints, signals). Two tasks exist: Pretraining below (the
generative objective alone) and finetune.FineTuning (a classifier on top, L_GEN + L_CLF). A task has

    heads                    {name: Module} trained beside the model (saved as head/<name>/...)
    start()                  (fine-tuning) once the pre-trained weights are in, before step 1
    decay                    "cosine" or "constant", the schedule after warm-up
    loss(x, y, rng)          the scalar loss Tensor of tokens x (B, T) with labels y (B,)
    evaluate()               {"loss": ..., ...} on the images data.val_tokens (run_data.RunData)
    describe(metrics)        one line for the log
    after_eval(metrics)      a reason to stop (fine-tuning's "early stop"), or None
    finish()                 the run's final results (samples.png, finetune.json)
    chart                    (title, y label, reference lines) of loss.png

Everything random is a function of (seed, step) (streams.py): epoch e visits the training images in
the order of generator(seed, "order", e); the crops, flips and BERT masks of micro-batch m of step s
come from generator(seed, "augment" / "mask", s, m). So a checkpoint holds only weights, Adam's
moments, the step, the palette and the settings, and a resumed run reaches bit-identical weights
(same thread count). The run's files are listed in run_folder.py.

Under mpiexec the run is data-parallel (parallel.py): each micro-batch is split into equal slices,
one per process, the gradients are averaged with one Allreduce, and the decisions to evaluate, save
or stop are taken together. Rank 0 alone writes files and shows progress.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
import time

import numpy as np
from tqdm import tqdm

from . import checkpoint as ck
from .data import augment, random_resized_crops
from .files import FolderBusy, check_writable
from .finetune import FineTuning
from .model import ImageGPT
from .objectives import NATS_TO_BITS, draw_mask, generative_loss
from .optim import Adam, clip_factor, grad_norm, lr_at
from .parallel import GradientBuffer, Solo, share, strided
from .plots import image_grid, save_png, with_caption
from .run_data import prepare_data
from .run_folder import RunFolder
from .runconfig import CHANGEABLE_ON_RESUME, DEFAULT_EPOCHS, ConfigError, RunConfig
from .sampling import generate
from .sizes import config_for, memory_problem, training_bytes
from .streams import generator
from .tensor import no_grad
from .threads import FairShare


class TrainingDiverged(Exception):
    """The loss became NaN or infinite."""


class Pretraining:
    """§2.1: the generative objective alone, L_AR or L_BERT (objectives.py)."""

    kind = "pretrain"
    decay = "cosine"  # §3.4: cosine decay to 0 after warm-up

    def __init__(self, run: "Trainer"):
        self.run, self.cfg = run, run.cfg
        self.heads = {}
        self.chart = (f"{self.cfg.size} on {self.cfg.data} {self.cfg.res}x{self.cfg.res}, "
                      f"{self.cfg.objective} loss", "nats per token",
                      {f"unigram entropy {run.data.entropy:.2f}": run.data.entropy})

    def loss(self, x, y, mask):
        return generative_loss(self.run.model, x, self.cfg.objective, mask=mask)

    def evaluate(self, batch_size: int = 64) -> dict:
        """{"loss": mean validation loss in nats per token} (BERT: per masked token, the same masks
        at every evaluation). Under MPI the batches are shared out and the sums added up."""
        run, tokens = self.run, self.run.data.val_tokens
        total = np.zeros(1)
        with no_grad():
            for rows, x, mask in run.eval_batches(tokens, batch_size):
                total += self.loss(x, None, mask).item() * len(x)
        return {"loss": float(run.comm.allreduce_sum(total)[0]) / max(len(tokens), 1)}

    def describe(self, m: dict) -> str:
        return (f"step {self.run.step}: val loss {m['loss']:.4f} nats/token "
                f"({m['loss'] * NATS_TO_BITS:.3f} bits), unigram {self.run.data.entropy:.3f}")

    def after_eval(self, m: dict):
        return None

    def finish(self) -> None:
        """samples.png: images sampled from the model (the AR model only: BERT has no sampler)."""
        cfg, run = self.cfg, self.run
        if cfg.objective != "ar":
            run.log("no samples.png: a BERT model has no raster-order sampler")
            return
        if cfg.samples < 1 or not run.comm.is_root:
            return
        tokens = generate(run.model, cfg.samples, generator(cfg.seed, "samples"), progress=True,
                          should_stop=lambda: run.stop_reason is not None)
        if tokens is None:
            run.log("sampling interrupted: no samples.png (the checkpoint was saved before)")
            return
        images = run.data.palette.decode(tokens)
        grid = with_caption(image_grid(images, ncols=8, scale=max(1, 96 // cfg.res)),
                            [f"{cfg.samples} samples from {cfg.size} after {run.step} steps on {cfg.data}",
                             f"{cfg.res}x{cfg.res}, temperature 1"])
        save_png(grid, run.folder.path / "samples.png")


class Trainer:
    """One run: its data, model, task, optimiser and schedule, and the loop that trains them."""

    def __init__(self, cfg: RunConfig, resume: bool = False, log=print, comm: Solo | None = None,
                 fair_share: FairShare | None = None):
        """resume: continue the run saved in cfg.out. cfg.finetune: start from that pre-trained
        checkpoint's palette and weights, with a classifier (§2.3). comm: the processes of a
        data-parallel run (parallel.world()); one process when None. fair_share: adapt the thread
        count to what other processes leave of the CPU, checked after every step (train.py passes
        one unless --threads fixes the count)."""
        self.comm, self.fair_share = comm or Solo(), fair_share
        self.cfg, self.log = cfg, (log if self.comm.is_root else lambda *a: None)
        self.folder = RunFolder(cfg.out)
        if cfg.batch_size % self.comm.size:
            raise ConfigError(f"--batch-size {cfg.batch_size} does not divide among {self.comm.size} "
                              f"processes: choose a multiple of {self.comm.size}")
        removed = []
        if self.comm.is_root:  # only rank 0 writes in the run folder
            check_writable(cfg.out, "--out")
            try:
                removed = self.folder.lock()   # held until train() ends: one run per folder
            except FolderBusy as e:
                raise ConfigError(str(e)) from None
        try:
            self._setup(resume, removed)
        except BaseException:
            self.folder.unlock()
            raise

    def _setup(self, resume: bool, removed: list) -> None:
        cfg, log = self.cfg, self.log
        if removed:
            log(f"removed {len(removed)} temporary file(s) a killed run left in {self.folder.path}")
        if cfg.res not in (8, 16, 24, 32, 48, 64):
            log(f"note: --res {cfg.res} is not a resolution the paper uses (32, 48, 64; the CPU presets "
                "here use 8 for streaks, 16 and 24): it trains, but nothing here was measured at it")
        if self.folder.ckpt.exists() and not resume:
            raise ConfigError(f"{self.folder.ckpt} exists: pass --resume to continue that run, or choose "
                              "another --out (nothing was overwritten)")
        check_writable(cfg.cache_dir, "--cache-dir")
        most = config_for(cfg.size, cfg.res, cfg.palette_size)  # V = palette_size bounds the memory
        problem = memory_problem(training_bytes(most, cfg.batch_size),
                                 f"a training step of {cfg.size} at {cfg.res}x{cfg.res}, batch {cfg.batch_size},",
                                 "lower --batch-size (--grad-accum keeps the batch), --res or --size")
        if problem:
            raise ConfigError(problem)

        start_path = self.folder.ckpt if resume else cfg.finetune
        start = ck.load_arrays(start_path) if start_path else None          # the checkpoint we start from
        self.data = prepare_data(cfg, start, start_path, log, self.comm)
        model_cfg = config_for(cfg.size, cfg.res, len(self.data.palette))  # V: the palette's colours
        self.model = ImageGPT(model_cfg, generator(cfg.seed, "init"))
        self.task = FineTuning(self, resume) if cfg.finetune else Pretraining(self)
        self.params = self.model.parameters() + [p for h in self.task.heads.values() for p in h.parameters()]
        self.opt = Adam(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.grads = GradientBuffer(self.params, self.comm)

        per_step = cfg.batch_size * cfg.grad_accum
        self.steps_per_epoch = max(1, len(self.data.train_tokens) // per_step)
        self.total = cfg.steps if cfg.steps is not None else \
            max(1, math.ceil((cfg.epochs or DEFAULT_EPOCHS) * self.steps_per_epoch))
        # default warm-up: one epoch (§3.4); departure: at most a tenth of the run, so short CPU runs
        # still decay
        self.warmup = (cfg.warmup_steps if cfg.warmup_steps is not None
                       else min(self.steps_per_epoch, max(1, self.total // 10)))
        self.eval_every = cfg.eval_every or max(1, self.total // 10)
        self.step = 0
        self.saved_step = None     # the step of the checkpoint in --out, once there is one
        self.changes = []          # settings changed on resume: [{"step", "setting", "from", "to"}]
        self.seconds_before = 0.0  # training time of earlier sessions of this run (from the checkpoint)
        self._t0 = None
        self.stop_reason = None
        if resume:
            self._restore(start)
        elif start is not None:
            self.load_weights(start, start_path)
            self.task.start()  # fine-tuning: --head-from-probe fits the classifier's start

    # ---- the loop ------------------------------------------------------------------------------
    def train(self, on_step=None) -> str:
        """Run to the last step, the time budget, an early stop or an interrupt; returns why it
        stopped. on_step(trainer) is called after every step (tests use it)."""
        cfg = self.cfg
        tokens_per_step = cfg.batch_size * cfg.grad_accum * self.model.config.n_ctx
        self.log(f"model: {cfg.size} ({self.model.num_parameters() / 1e6:.2f}M parameters), "
                 f"objective {cfg.objective}, {tokens_per_step} tokens per step "
                 f"({cfg.batch_size} x {cfg.grad_accum} images), {self.total} steps "
                 f"({self.total / self.steps_per_epoch:.2f} epochs), warm-up {self.warmup}, lr {cfg.lr:g}")
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        t0 = last_ckpt = self._t0 = time.time()
        first_step = self.step
        bar = tqdm(total=self.total, initial=self.step, unit="step", dynamic_ncols=True, desc="train",
                   smoothing=0, disable=not self.comm.is_root)  # ETA from the whole run's rate
        metrics_file = self.folder.open_metrics(self.step) if self.comm.is_root else contextlib.nullcontext()
        try:
            with metrics_file as metrics:
                while self.step < self.total and self.stop_reason is None:
                    t_step = time.time()
                    lr = lr_at(self.step, cfg.lr, self.warmup, self.total, self.task.decay)
                    loss, norm = self.optimizer_step(lr)

                    tok_s = tokens_per_step / (time.time() - t_step)
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}")
                    threads = self.fair_share.update() if self.fair_share is not None else None
                    if threads is not None:
                        bar.write(self.fair_share.describe())
                    if self.step == first_step + 1:
                        first_seconds = time.time() - t0
                    if self.step == first_step + 2:
                        t_settled = time.time()  # later steps no longer compile anything
                    if self.step == first_step + 5 and self.step < self.total:
                        self.log(self.estimate((time.time() - t_settled) / 3, first_seconds))
                    if self.comm.is_root and (self.step % cfg.log_every == 0 or self.step == self.total):
                        self.folder.write(metrics, self.step, kind="train", loss=loss, lr=lr,
                                          grad_norm=norm, tokens_per_s=tok_s, elapsed_s=time.time() - t0)
                    if self.step % self.eval_every == 0 or self.step == self.total:
                        self.evaluate(metrics, bar.write, time.time() - t0)
                    if on_step is not None:
                        on_step(self)
                    if cfg.time_budget is not None and self.train_seconds() > cfg.time_budget * 60:
                        self.stop_reason = "time budget"
                    save_due = time.time() - last_ckpt > cfg.ckpt_every * 60
                    if self.agree_to_stop(save_due) and self.stop_reason is None:
                        self.save()
                        last_ckpt = time.time()
            self.save()
            if self.comm.is_root:
                self.folder.plot_loss(*self.task.chart, evaluated=self.data.eval_name)
            if self.step >= self.total or self.stop_reason in ("early stop", "time budget"):
                self.task.finish()  # a spent budget ends the run as planned: its results are written too
        finally:
            bar.close()
            for s, handler in previous.items():
                signal.signal(s, handler)
            self.folder.unlock()
        if self.step >= self.total or self.stop_reason == "early stop":
            self.log(f"done: {self.step} steps in {(time.time() - t0) / 60:.1f} min; wrote {self.folder.ckpt}")
            return "done"
        self.log(f"stopped at step {self.step} of {self.total} ({self.stop_reason}); saved "
                 f"{self.folder.ckpt}. Resume with: python train.py --resume --out {self.folder.path}")
        return self.stop_reason

    def estimate(self, per_step: float, first_seconds: float) -> str:
        """The time estimate printed once, from steps after the first two: the first steps of a new
        install compile numba's kernels (cached for later runs), which says nothing of the rest."""
        to_go = per_step * (self.total - self.step)
        line = (f"~{per_step:.2f} s per step: {per_step * self.steps_per_epoch / 60:.1f} min per epoch, "
                f"{to_go / 60:.1f} min to go")
        if self.cfg.time_budget is not None:
            left = max(0.0, self.cfg.time_budget * 60 - self.train_seconds())
            if left < to_go:
                line += f", but --time-budget stops the run in {left / 60:.1f} min"
        if first_seconds > 5 * per_step + 2:
            line += (f" (the first step took {first_seconds:.0f} s: numba compiled the kernels, once per "
                     "install; later runs load them from its cache)")
        return line

    STOPS = (None, "interrupted", "time budget", "early stop")

    def agree_to_stop(self, save_due: bool) -> bool:
        """Make every rank take the same decisions after a step: stop if any rank must stop (a
        signal reaches them at different moments), save if any rank's checkpoint timer ran out.
        Returns whether to save now."""
        flags = np.array([self.STOPS.index(self.stop_reason), int(save_due)], dtype=np.int64)
        flags = self.comm.allreduce_max(flags)
        self.stop_reason = self.STOPS[int(flags[0])]
        return bool(flags[1])

    def weights_finite(self) -> bool:
        return all(np.isfinite(p.data).all() for p in self.params)

    def diverged(self, what: str) -> "TrainingDiverged":
        """The error for a run that went non-finite at the coming step; nothing is saved over the
        last good checkpoint."""
        if self.saved_step is None:
            kept = f"no checkpoint was written: start again with a lower --lr (now {self.cfg.lr:g})"
        else:
            kept = (f"{self.folder.ckpt} keeps the weights of step {self.saved_step}: resume with a lower "
                    f"--lr (now {self.cfg.lr:g}) or a tighter --clip (now {self.cfg.clip:g})")
        return TrainingDiverged(f"{what} at step {self.step + 1}; {kept}")

    def optimizer_step(self, lr: float):
        """One optimiser step at learning rate lr (the formulas in the module docstring); returns
        (loss, gradient norm before clipping). Anything non-finite stops the run before it is kept."""
        loss = self.accumulate_gradients()
        if not math.isfinite(loss):
            raise self.diverged(f"the loss became {loss}")
        norm = grad_norm(self.params)
        if not math.isfinite(norm):
            raise self.diverged(f"the gradient norm became {norm}")
        finite = self.opt.step(lr, grad_scale=clip_factor(norm, self.cfg.clip))
        self.opt.zero_grad()
        if not finite:
            raise self.diverged("the update made weights non-finite")
        self.step += 1
        return loss, norm

    def accumulate_gradients(self) -> float:
        """Back-propagate the grad_accum micro-batches of this step (this rank's slice of each),
        average the gradients over the ranks; returns the step's mean loss."""
        cfg, loss_sum = self.cfg, np.zeros(1)
        for micro in range(cfg.grad_accum):
            x, y = self.batch(self.step, micro)                                  # the whole micro-batch
            mask = self.mask_for(x, generator(cfg.seed, "mask", self.step, micro))
            mine = share(len(x), self.comm)                                      # this rank's slice
            loss = self.task.loss(x[mine], y[mine], None if mask is None else mask[mine])
            loss.backward(np.array(1.0 / cfg.grad_accum, dtype=loss.dtype))
            loss_sum += loss.item() / cfg.grad_accum
            del loss  # free this graph before the next forward
        self.grads.average()
        return float(self.comm.allreduce_sum(loss_sum)[0]) / self.comm.size

    def eval_batches(self, tokens: np.ndarray, batch_size: int, desc: str = "evaluating"):
        """(rows, x, mask) for this rank's batches of `tokens` (batch b on rank b % size, its BERT
        mask from generator(seed, "eval", b), the same at every evaluation and for any number of
        ranks), behind a progress bar. A stop signal ends it before the next batch; the caller's
        partial result is then dropped (Trainer.evaluate)."""
        for b in tqdm(strided(-(-len(tokens) // batch_size), self.comm), desc=desc, unit="batch",
                      leave=False, disable=not self.comm.is_root):
            if self.stop_reason is not None:
                return
            rows = slice(b * batch_size, (b + 1) * batch_size)
            x = tokens[rows].astype(np.int64)
            yield rows, x, self.mask_for(x, generator(self.cfg.seed, "eval", b))

    def mask_for(self, x: np.ndarray, rng):
        """The objective's input mask for tokens x (BERT's masked positions; None for AR)."""
        return draw_mask(self.cfg.objective, x.shape, self.cfg.mask_rate, rng)

    def batch(self, step: int, micro: int):
        """Tokens (B, T) and labels (B,) of micro-batch `micro` of step `step`: a function of
        (seed, step). Epochs follow each other endlessly, each in its own order."""
        B, N = self.cfg.batch_size, len(self.data.train_tokens)
        start = (step * self.cfg.grad_accum + micro) * B
        idx = np.asarray([self._order(g // N)[g % N] for g in range(start, start + B)])
        rng, res = generator(self.cfg.seed, "augment", step, micro), self.cfg.res
        if self.cfg.augment == "crop":   # §3.4: crops of the full-resolution images, then quantised
            x = self.data.palette.encode(random_resized_crops(self.data.ds.full_train[idx], res, rng))
        else:
            x = self.data.train_tokens[idx]                                      # (B, T)
        if self.cfg.augment == "wrn":
            x = augment(x.reshape(B, res, res), rng).reshape(B, -1)
        return x.astype(np.int64), self.data.ds.train.labels[idx]

    def _order(self, epoch: int) -> np.ndarray:
        """The order in which epoch `epoch` visits the training images (the latest one is kept)."""
        if getattr(self, "_order_epoch", None) != epoch:
            self._order_epoch = epoch
            self._order_cache = generator(self.cfg.seed, "order", epoch).permutation(
                len(self.data.train_tokens))
        return self._order_cache

    def evaluate(self, metrics, write, elapsed: float) -> None:
        """Evaluate the task, record it, keep a snapshot (--snapshots), and let the task decide
        whether to stop."""
        val = self.task.evaluate()
        if self.stop_reason is not None:  # interrupted during the evaluation: nothing to record
            return
        if self.comm.is_root:
            self.folder.write(metrics, self.step, kind="eval", **val, elapsed_s=elapsed)
            write(self.task.describe(val))
        if self.cfg.snapshots:
            self.save(self.folder.snapshot(self.step), weights_only=True, val_loss=val["loss"])
        reason = self.task.after_eval(val)
        if reason is not None:
            self.stop_reason = reason

    def _on_signal(self, signum, frame):
        if self.stop_reason is not None:  # a second Ctrl-C: stop now (the checkpoint is atomic)
            raise KeyboardInterrupt
        self.stop_reason = "interrupted"

    def train_seconds(self) -> float:
        """Training time of this run so far, earlier sessions included."""
        return self.seconds_before + (time.time() - self._t0 if self._t0 is not None else 0.0)

    # ---- checkpoints ---------------------------------------------------------------------------
    def save(self, path=None, weights_only: bool = False, **meta_extra) -> None:
        """The model, the task's heads and (unless weights_only) Adam's state, with the run's
        settings and step in the meta."""
        if not self.weights_finite():  # never write non-finite weights over a good checkpoint
            raise self.diverged("the weights are not finite")
        self.grads.check_agreement()  # under MPI: every rank must hold the same weights
        meta = {"run": dataclasses.asdict(self.cfg), "step": self.step, "total_steps": self.total,
                "data_hash": self.data.data_hash, "unigram_entropy": self.data.entropy,
                "kind": self.task.kind, "classes": list(self.data.ds.classes),
                "train_seconds": self.train_seconds(), "changes": self.changes, **meta_extra}
        extra = {}
        for name, head in self.task.heads.items():
            extra.update({f"head/{name}/{k}": v for k, v in head.state_dict().items()})
        if not weights_only:
            extra.update({f"opt/{k}": v for k, v in self.opt.state_dict().items()})
        if self.comm.is_root:
            ck.save_model(path or self.folder.ckpt, self.model, self.data.palette.centers, meta=meta,
                          extra=extra)
        self.comm.barrier()  # the file exists for every rank once save returns
        if path is None:
            self.saved_step = self.step

    def load_weights(self, arrays: dict, path, heads: bool = False) -> None:
        """The model's weights (and the task's heads', when `heads`) from checkpoint arrays."""
        modules = {"model": self.model}
        if heads:
            modules.update({f"head/{n}": h for n, h in self.task.heads.items()})
        for prefix, module in modules.items():
            try:
                module.load_state_dict(ck.sub_state(arrays, prefix))
            except (KeyError, ValueError) as e:
                raise ConfigError(f"{path} holds another model ({e}): start a new --out") from None

    def _restore(self, arrays: dict) -> None:
        """Continue the run saved in arrays: weights, heads, Adam's state, step and time trained."""
        _, meta = ck.read_config(arrays, self.folder.ckpt)
        if meta.get("data_hash") != self.data.data_hash:
            raise ConfigError(f"{self.folder.ckpt} was trained on other data (its tokens differ from "
                              f"{self.cfg.data}'s now): resume with the same data, or start a new --out")
        self.load_weights(arrays, self.folder.ckpt, heads=True)
        try:
            self.opt.load_state_dict(ck.sub_state(arrays, "opt"))
            self.step = self.saved_step = int(meta["step"])
            self.seconds_before = float(meta.get("train_seconds", 0.0))
            self.changes = list(meta.get("changes", []))
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"{self.folder.ckpt} holds a damaged optimiser state or step ({e}): "
                              "resume from an intact copy, or start a new --out") from None
        self.log(f"resumed {self.folder.ckpt} at step {self.step} ({self.seconds_before / 60:.1f} min trained)")
        saved = meta.get("run", {})
        for key in CHANGEABLE_ON_RESUME:
            if key in saved and saved[key] != getattr(self.cfg, key):
                self.changes.append({"step": self.step, "setting": key, "from": saved[key],
                                     "to": getattr(self.cfg, key)})
                self.log(f"--{key} changed from {saved[key]:g} to {getattr(self.cfg, key):g} at step "
                         f"{self.step}: the run is no longer bit-identical to an uninterrupted one")
