"""§3.4 Training: the loop behind train.py, for pre-training (§2.1) and fine-tuning (§2.3).

One optimiser step at learning rate lr(step) (optim.lr_at: linear warm-up, then cosine decay to 0
when pre-training, constant when fine-tuning: §3.4 "we do not employ a cosine schedule"):

    for each of grad_accum micro-batches x_m of batch_size images:
        grads += d(loss(x_m) / grad_accum) / d(params)        the gradients of one batch of
                                                              batch_size * grad_accum images
    grads *= clip / ||grads|| if ||grads|| > clip             departure: the paper mentions no gradient clipping
    params = Adam(params, grads, lr(step))                    beta1 = 0.9, beta2 = 0.95 (optim.py)

The loss is the task's (tasks.py: L_GEN when pre-training, L_GEN + L_CLF when fine-tuning). The
Trainer owns everything else: data, model, optimiser, schedule, the evaluations, the best checkpoint
and the patience counter (a task with a score: §3.4 "early stop once we reach the maximum validation
accuracy"), checkpoints and signals. Every number it steps by comes from the run's Plan
(runconfig.plan); it derives none.

Everything random is a function of (seed, step) (streams.py): epoch e visits the training images in
the order of generator(seed, "order", e); the crops, flips and BERT masks of micro-batch m of step s
come from generator(seed, "augment" / "mask", s, m). So a checkpoint holds the weights, Adam's
moments, the step, the palette, the settings, the plan and what the evaluations decided so far (the
best score, evaluations since it), and a resumed run reaches bit-identical weights and files (same
thread count). The run's files are listed in run_folder.py.

Under mpiexec the run is data-parallel (parallel.py): each micro-batch is split into equal slices,
one per process, the gradients are averaged with one Allreduce, and the decisions to evaluate, save
or stop are taken together. Rank 0 alone writes files and shows progress.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
import sys
import time

import numpy as np
from tqdm import tqdm

from . import checkpoint as ck
from .data import augment, check_present, load_dataset, random_resized_crops
from .errors import ConfigError, FolderBusy, Interrupted, TrainingDiverged
from .evaluation import Evaluation
from .files import check_writable
from .forecast import forecast, human_time, memory_line
from .model import ImageGPT
from .objectives import draw_mask
from .optim import Adam, clip_factor, grad_norm, lr_at
from .parallel import GradientBuffer, Solo, average, share
from .run_data import prepare_data
from .run_folder import RunFolder
from .runconfig import CHANGEABLE_ON_RESUME, RunConfig, plan
from .sizes import SIZES, config_for, memory_problem, training_bytes
from .streams import generator
from .tasks import FineTuning, Pretraining
from .threads import FairShare

STOPS = (None, "interrupted", "time budget", "early stop")  # why a run stops before its last step


def _score(value):
    """A best score read from a checkpoint: None (none yet) or an accuracy in [0, 1]."""
    if value is None or (isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 1):
        return value
    raise ValueError(f"a best score of {value!r}")


class Trainer(Evaluation):
    """One run: its data, model, task, optimiser and plan, and the loop that trains them."""

    def __init__(self, cfg: RunConfig, resume: bool = False, log=print, comm: Solo | None = None,
                 fair_share: FairShare | None = None):
        """cfg: resolved settings (runconfig.resolve_config). resume: continue the run saved in
        cfg.out. cfg.finetune: start from that pre-trained checkpoint's palette and weights, with a
        classifier (§2.3). comm: the processes of a data-parallel run (parallel.world()); one process
        when None. fair_share: adapt the thread count to what other processes leave of the CPU,
        checked after every step (train.py passes one unless --threads fixes the count)."""
        self.comm, self.fair_share = comm or Solo(), fair_share
        self.cfg, self.log = cfg, (log if self.comm.is_root else lambda *a: None)
        self.folder = RunFolder(cfg.out)
        check_present(cfg.data, cfg.data_dir)  # before anything is written
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
        start = None                                                          # the weights we start from
        if start_path:  # a fine-tune may start from a Hugging Face folder or hub name (hub.py)
            start, start_path = ck.start_arrays(start_path)
        saved = ck.read_config(start, start_path)[1] if resume else {}
        ds = load_dataset(cfg.data, cfg.data_dir, res=cfg.res, seed=cfg.seed,
                          full_train=cfg.augment == "crop")  # the crops are cut before downsampling
        self.plan = plan(cfg, len(ds.train), len(ds.val), ds.test is not None, SIZES[cfg.size][0],
                         self.comm.size, saved=saved.get("plan"))
        self.data = prepare_data(cfg, self.plan, ds, start, start_path, log, self.comm)
        model_cfg = config_for(cfg.size, cfg.res, len(self.data.palette))  # V: the palette's colours
        self.model = ImageGPT(model_cfg, generator(cfg.seed, "init"))
        self.task = (FineTuning(cfg.objective, model_cfg.n_embd, len(self.data.ds.classes), self.plan.pool_layers,
                                cfg.seed, cfg.clf_only, head_bias=cfg.head_from_probe)
                     if cfg.finetune else Pretraining(cfg.objective))
        self.params = self.model.parameters() + [p for h in self.task.heads.values() for p in h.parameters()]
        self.opt = Adam(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.grads = GradientBuffer(self.params, self.comm)
        self.step = 0
        self.saved_step = None     # the step of the checkpoint in --out, once there is one
        self.changes = []          # settings changed on resume: [{"step", "setting", "from", "to"}]
        self.seconds_before = 0.0  # training time of earlier sessions of this run (from the checkpoint)
        self.best = {"score": None, "step": None, "evals_since": 0}  # the evaluations' decisions so far
        self._t0 = None
        self.stop_reason = None
        if resume:
            self._restore(start, saved)
        elif start is not None:
            self.load_weights(start, start_path)

    # ---- the loop ------------------------------------------------------------------------------
    def train(self, on_step=None) -> str:
        """Run to the last step, the time budget, an early stop or an interrupt, then write the
        results of a run that ended as planned; returns "done" or why it stopped. on_step(trainer)
        is called after every step (tests use it)."""
        cfg, plan = self.cfg, self.plan
        with self._session() as metrics:
            while self.step < plan.total_steps and self.stop_reason is None:
                lr = lr_at(self.step, cfg.lr, plan.warmup_steps, plan.total_steps, plan.decay)  # schedule
                loss, norm = self.optimizer_step(lr)
                self.after_step(metrics, loss, lr, norm, on_step)  # log, evaluate, stop, checkpoint
        return self._finish()

    def optimizer_step(self, lr: float):
        """One optimiser step at learning rate lr (the module docstring's formulas) -> (loss,
        gradient norm before clipping). Anything non-finite stops the run before it is kept."""
        cfg, loss = self.cfg, 0.0
        for micro in range(cfg.grad_accum):
            x, y, mask = self.batch(self.step, micro)                          # this process's slice
            micro_loss = self.task.loss(self.model, x, y, mask)                # forward
            micro_loss.backward(np.array(1.0 / cfg.grad_accum, dtype=micro_loss.dtype))  # backward
            loss += micro_loss.item() / cfg.grad_accum
            del micro_loss                                                     # free this graph
        self.grads.average()                                                   # MPI: mean over ranks
        loss = float(average([loss], self.comm.size, self.comm)[0])
        if not math.isfinite(loss):
            raise self.diverged(f"the loss became {loss}")
        norm = grad_norm(self.params)
        if not math.isfinite(norm):
            raise self.diverged(f"the gradient norm became {norm}")
        finite = self.opt.step(lr, grad_scale=clip_factor(norm, cfg.clip))     # clip, then Adam
        self.opt.zero_grad()
        if not finite:
            raise self.diverged("the update made weights non-finite")
        self.step += 1
        return loss, norm

    def after_step(self, metrics, loss: float, lr: float, norm: float, on_step) -> None:
        """Everything a step is followed by: progress, metrics, the time estimate, evaluation, the
        time budget, and the checkpoint when its timer ran out (the ranks decide together)."""
        cfg, now = self.cfg, time.time()
        self._step_seconds = now - self._t_step
        tok_s = self._tokens_per_step / self._step_seconds
        self._bar.update(1)
        self._bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}")
        if self.fair_share is not None and self.fair_share.update() is not None:
            self._bar.write(self.fair_share.describe())
        done = self.step - self._first_step
        if done == 1:
            self._first_seconds = now - self._t0
        if done >= 3:  # the first two steps compile the kernels: they say nothing of the rest
            self._timed.append(self._step_seconds)
        if (self._timed and not self._estimated and self.step < self.plan.total_steps
                and (len(self._timed) >= 3 or sum(self._timed) > 30)):  # 3 steps, or enough seconds
            self._estimated = True
            self.log(self.estimate(sum(self._timed) / len(self._timed), self._first_seconds))
        if self.comm.is_root and (self.step % cfg.log_every == 0 or self.step == self.plan.total_steps):
            self.folder.write(metrics, self.step, kind="train", loss=loss, lr=lr, grad_norm=norm,
                              tokens_per_s=tok_s, elapsed_s=now - self._t0)
        if self.step % self.plan.eval_every == 0 or self.step == self.plan.total_steps:
            self.evaluate(metrics, self._bar.write)
        if on_step is not None:
            on_step(self)
        if cfg.time_budget is not None and self.train_seconds() > cfg.time_budget * 60 and self.stop_reason is None:
            self.stop_reason = "time budget"
        if self.agree_to_stop(time.time() - self._last_ckpt > cfg.ckpt_every * 60) and self.stop_reason is None:
            self.save()
            self._last_ckpt = time.time()
        self._t_step = time.time()

    @contextlib.contextmanager
    def _session(self):
        """Around the loop: the signal handlers, the progress bar and the metrics file; on a normal
        end the last checkpoint and loss.png; always the folder's lock released."""
        cfg = self.cfg
        self._tokens_per_step = cfg.batch_size * cfg.grad_accum * self.model.config.n_ctx
        self.log(f"model: {cfg.size}, {memory_line(self.model.config, self.plan.per_process)}; objective "
                 f"{cfg.objective}, {self._tokens_per_step} tokens per step ({cfg.batch_size} x {cfg.grad_accum} "
                 f"images), {self.plan.total_steps} steps ({self.plan.total_steps / self.plan.steps_per_epoch:.2f} "
                 f"epochs), warm-up {self.plan.warmup_steps}, lr {cfg.lr:g}; the time estimate follows the "
                 "first steps")
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        self._t0 = self._t_step = self._last_ckpt = time.time()
        self._estimated, self._step_seconds, self._timed = False, None, []  # the steps' own times
        self._first_step = self.step
        self._bar = tqdm(total=self.plan.total_steps, initial=self.step, unit="step", dynamic_ncols=True,
                         desc="train", smoothing=0, disable=not self.comm.is_root)  # ETA from the run's rate
        metrics = self.folder.open_metrics(self.step) if self.comm.is_root else contextlib.nullcontext()
        try:
            with metrics as f:
                yield f
            self.save()
            if self.comm.is_root:
                self.folder.plot_loss(*self.chart(), evaluated=self.plan.eval_on)
        except KeyboardInterrupt:  # a second Ctrl-C (_on_signal): stop now, mid-step
            kept = (f"{self.folder.ckpt} keeps step {self.saved_step}: resume with python train.py --resume --out "
                    f"{self.folder.path}" if self.saved_step is not None else "no checkpoint was written yet")
            raise Interrupted(f"stopped at once during step {self.step + 1}; {kept}") from None
        finally:
            self._bar.close()
            for s, handler in previous.items():
                signal.signal(s, handler)

    def chart(self) -> tuple:
        """(title, y label, reference lines) of loss.png."""
        cfg, where = self.cfg, f"{self.cfg.size} on {self.cfg.data} {self.cfg.res}x{self.cfg.res}"
        if self.task.score is None:
            return (f"{where}, {cfg.objective} loss", "nats per token",
                    {f"unigram entropy {self.data.entropy:.2f}": self.data.entropy})
        what = "L_CLF" if cfg.clf_only else "L_GEN + L_CLF"
        return f"fine-tuning {where}: {what}", f"{what} (nats)", {}

    def _finish(self) -> str:
        """The results of a run that ended as planned (its last step, its budget, an early stop):
        samples.png when pre-training, the best checkpoint scored when fine-tuning."""
        try:
            if self.stop_reason != "interrupted":
                self.score_best() if self.task.score is not None else self.draw_samples()
        finally:
            self.folder.unlock()
        if self.step >= self.plan.total_steps or self.stop_reason == "early stop":
            self.log(f"done: {self.step} steps in {(time.time() - self._t0) / 60:.1f} min; wrote {self.folder.ckpt}")
            return "done"
        self.log(f"stopped at step {self.step} of {self.plan.total_steps} ({self.stop_reason}); saved "
                 f"{self.folder.ckpt}. Resume with: python train.py --resume --out {self.folder.path}")
        return self.stop_reason

    def estimate(self, per_step: float, first_seconds: float) -> str:
        """The time estimate printed once, from steps after the first two: the first steps of a new
        install compile numba's kernels (cached for later runs), which says nothing of the rest
        (forecast.py: and what would fit when it is days)."""
        budget = self.cfg.time_budget
        lines = forecast(per_step, self.plan.total_steps - self.step, self.plan.steps_per_epoch, self.model.config,
                         self.cfg.size, None if budget is None else max(0.0, budget * 60 - self.train_seconds()))
        if first_seconds > 5 * per_step + 2:
            lines[0] += (f" (the first step took {human_time(first_seconds)}: numba compiled the kernels, once per "
                         "install; later runs load them from its cache)")
        return "\n".join(lines)

    def agree_to_stop(self, save_due: bool) -> bool:
        """Make every rank take the same decisions after a step: stop if any rank must stop (a
        signal reaches them at different moments), save if any rank's checkpoint timer ran out.
        Returns whether to save now."""
        flags = self.comm.allreduce_max(np.array([STOPS.index(self.stop_reason), int(save_due)], dtype=np.int64))
        self.stop_reason = STOPS[int(flags[0])]
        return bool(flags[1])

    def diverged(self, what: str) -> TrainingDiverged:
        """The error for a run that went non-finite at the coming step; nothing is saved over the
        last good checkpoint."""
        if self.saved_step is None:
            kept = f"no checkpoint was written: start again with a lower --lr (now {self.cfg.lr:g})"
        else:
            kept = (f"{self.folder.ckpt} keeps the weights of step {self.saved_step}: resume with a lower "
                    f"--lr (now {self.cfg.lr:g}) or a tighter --clip (now {self.cfg.clip:g})")
        return TrainingDiverged(f"{what} at step {self.step + 1}; {kept}")

    def batch(self, step: int, micro: int):
        """This process's share of micro-batch `micro` of step `step`: tokens (b, T), labels (b,) and
        the objective's input mask (BERT's masked positions, or None), a function of (seed, step).
        Epochs follow each other endlessly, each in its own order."""
        cfg, B, N = self.cfg, self.cfg.batch_size, len(self.data.train_tokens)
        start = (step * cfg.grad_accum + micro) * B
        idx = np.asarray([self._order(g // N)[g % N] for g in range(start, start + B)])
        rng = generator(cfg.seed, "augment", step, micro)
        if cfg.augment == "crop":   # §3.1: crops of the full-resolution images, then quantised
            x = self.data.palette.encode(random_resized_crops(self.data.ds.full_train[idx], cfg.res, rng))
        else:
            x = self.data.train_tokens[idx]                                      # (B, T)
        if cfg.augment == "wrn":
            x = augment(x.reshape(B, cfg.res, cfg.res), rng).reshape(B, -1)
        x = x.astype(np.int64)
        mask = draw_mask(cfg.objective, x.shape, cfg.mask_rate, generator(cfg.seed, "mask", step, micro))
        mine = share(B, self.comm)                                               # this rank's slice
        return x[mine], self.data.ds.train.labels[idx][mine], None if mask is None else mask[mine]

    def _order(self, epoch: int) -> np.ndarray:
        """The order in which epoch `epoch` visits the training images (the latest one is kept)."""
        if getattr(self, "_order_epoch", None) != epoch:
            self._order_epoch = epoch
            self._order_cache = generator(self.cfg.seed, "order", epoch).permutation(
                len(self.data.train_tokens))
        return self._order_cache

    def _on_signal(self, signum, frame):
        """Ctrl-C (or SIGTERM): stop after this step, saying so at once; a second one stops now (the
        checkpoint is written atomically: the last one stays intact)."""
        if self.stop_reason == "interrupted":
            raise KeyboardInterrupt
        self.stop_reason = "interrupted"
        if self.comm.is_root:
            left = (f"about {human_time(max(0.0, self._step_seconds - (time.time() - self._t_step)))}"
                    if getattr(self, "_step_seconds", None) else "its length not known yet")
            kept = (f"keeping the checkpoint of step {self.saved_step}" if self.saved_step is not None
                    else "no checkpoint written yet")
            print(f"\nstopping after this step ({left}), then saving; Ctrl-C again stops now, {kept}",
                  file=sys.stderr, flush=True)

    def train_seconds(self) -> float:
        """Training time of this run so far, earlier sessions included."""
        return self.seconds_before + (time.time() - self._t0 if self._t0 is not None else 0.0)

    # ---- checkpoints ---------------------------------------------------------------------------
    def save(self, path=None, weights_only: bool = False, **meta_extra) -> None:
        """The model, the task's heads and (unless weights_only) Adam's state, with the run's
        settings, plan, step and the evaluations' decisions in the meta."""
        if not all(np.isfinite(p.data).all() for p in self.params):  # never over a good checkpoint
            raise self.diverged("the weights are not finite")
        self.grads.check_agreement()  # under MPI: every rank must hold the same weights
        meta = {"run": dataclasses.asdict(self.cfg), "plan": dataclasses.asdict(self.plan), "step": self.step,
                "total_steps": self.plan.total_steps, "data_hash": self.data.data_hash,
                "unigram_entropy": self.data.entropy, "kind": self.task.kind, "classes": list(self.data.ds.classes),
                "train_seconds": self.train_seconds(), "changes": self.changes, "best": self.best, **meta_extra}
        extra = {}
        for name, head in self.task.heads.items():
            extra.update({f"head/{name}/{k}": v for k, v in head.state_dict().items()})
        if not weights_only:
            extra.update({f"opt/{k}": v for k, v in self.opt.state_dict().items()})
        if self.comm.is_root:
            ck.save_model(path or self.folder.ckpt, self.model, self.data.palette.centers, meta=meta, extra=extra)
        self.comm.barrier()  # the file exists for every rank once save returns
        if path is None:
            self.saved_step = self.step

    def load_weights(self, arrays: dict, path, heads: bool = False) -> None:
        """The model's weights (and the task's heads', when `heads`) from checkpoint arrays."""
        modules = {"model": self.model}
        if heads:
            modules.update({f"head/{n}": h for n, h in self.task.heads.items()})
        for prefix, module in modules.items():
            state = ck.sub_state(arrays, prefix)
            ck.check_finite(state, path)
            try:
                module.load_state_dict(state)
            except (KeyError, ValueError) as e:
                raise ConfigError(f"{path} holds another model ({e}): start a new --out") from None

    def _restore(self, arrays: dict, meta: dict) -> None:
        """Continue the run saved in arrays (meta: its meta): weights, heads, Adam's state, step,
        time trained and the evaluations' decisions."""
        if meta.get("data_hash") != self.data.data_hash:
            raise ConfigError(f"{self.folder.ckpt} was trained on other data (its tokens differ from "
                              f"{self.cfg.data}'s now): resume with the same data, or start a new --out")
        self.load_weights(arrays, self.folder.ckpt, heads=True)
        try:
            self.opt.load_state_dict(ck.sub_state(arrays, "opt"))
            self.step = self.saved_step = int(meta["step"])
            self.seconds_before = float(meta.get("train_seconds", 0.0))
            self.changes = list(meta.get("changes", []))
            if "best" in meta:
                best = meta["best"]
                self.best = {"score": _score(best["score"]), "step": best["step"], "evals_since": int(best["evals_since"])}
                if not (self.best["step"] is None or isinstance(self.best["step"], int)) or self.best["evals_since"] < 0:
                    raise ValueError(f"best {best}")
            elif self.folder.best.exists():  # written before the checkpoint kept the decisions
                self.best["score"] = _score(ck.read_meta(self.folder.best)[1].get("val_acc"))
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"{self.folder.ckpt} holds a damaged optimiser state or step ({e}): "
                              "resume from an intact copy, or start a new --out") from None
        if self.task.score is not None and self.best["evals_since"] >= self.cfg.patience:
            self.stop_reason = "early stop"  # decided before the stop: only the results are left to write
        self.log(f"resumed {self.folder.ckpt} at step {self.step} ({self.seconds_before / 60:.1f} min trained)")
        saved = meta.get("run", {})
        for key in CHANGEABLE_ON_RESUME:
            if key in saved and saved[key] != getattr(self.cfg, key):
                self.changes.append({"step": self.step, "setting": key, "from": saved[key],
                                     "to": getattr(self.cfg, key)})
                self.log(f"--{key} changed from {saved[key]:g} to {getattr(self.cfg, key):g} at step "
                         f"{self.step}: the run is no longer bit-identical to an uninterrupted one")
