"""§3.4 Training: the pre-training run behind train.py.

One optimiser step: for each of `grad_accum` micro-batches of `batch_size` images, the objective's
loss (objectives.py) is back-propagated with weight 1/grad_accum, so the gradients add up to those of
one batch of batch_size * grad_accum; then the global gradient norm is clipped, and Adam (optim.py)
takes a step at the scheduled learning rate (linear warm-up, cosine decay to 0).

Everything random is a function of (seed, step): epoch e visits the training images in the order
permutation(seed, e), and the crops, flips and BERT masks of step s come from a generator seeded with
(seed, s). So a checkpoint holds only weights, Adam's moments, the step, the palette and the run's
configuration, and a resumed run reaches bit-identical weights (same thread count).

Files in --out: ckpt.npz (atomic, every --ckpt-every minutes, at the end, on Ctrl-C), metrics.jsonl
(one JSON line per log step and per evaluation), loss.png, samples.png; with --snapshots also
snapshots/step<N>.npz, the weights at every evaluation (no optimiser state), for probing checkpoints
along the run against their validation loss (§4.2). The checkpoint counts the training time of all
sessions so far, so --time-budget bounds a run continued with --resume as a whole.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from . import checkpoint as ck
from .data import augment, cached_tokens, load_dataset
from .model import ImageGPT
from .objectives import NATS_TO_BITS, generative_loss, unigram_entropy
from .optim import Adam, clip_grad_norm, lr_at
from .palette import Palette, fit_palette, load_palette
from .plots import image_grid, line_chart, save_png
from .sampling import generate
from .sizes import config_for, default_batch
from .tensor import no_grad


class ConfigError(Exception):
    """A run configuration that cannot work; the message names the flag and the fix."""


class TrainingDiverged(Exception):
    """The loss became NaN or infinite."""


@dataclass
class RunConfig:
    size: str = "micro"
    res: int = 16
    data: str = "shapes"
    data_dir: str = "data"
    objective: str = "ar"
    mask_rate: float = 0.15
    batch_size: int | None = None   # None: the size's default (sizes.py)
    grad_accum: int = 1
    lr: float = 3e-3
    steps: int | None = None
    epochs: float | None = None
    warmup_steps: int | None = None
    weight_decay: float = 0.0
    clip: float = 1.0
    palette_size: int = 512
    palette: str | None = None       # a palette file to use instead of fitting one (palette.load_palette)
    augment: bool = True
    seed: int = 0
    out: str = "runs/default"
    cache_dir: str = "runs/cache"
    eval_every: int | None = None
    eval_images: int = 512
    log_every: int = 10
    ckpt_every: float = 10.0
    time_budget: float | None = None  # minutes of training, summed over the sessions of a resumed run
    snapshots: bool = False            # keep the weights of every evaluation step (§4.2 probes along a run)
    samples: int = 16
    finetune: str | None = None      # §2.3: a pre-trained checkpoint to fine-tune (finetune.py)
    clf_only: bool = False           # fine-tuning: L_CLF alone, without L_GEN
    patience: int = 5                # fine-tuning: evaluations without a better val accuracy

    def __post_init__(self):
        if self.batch_size is None:
            self.batch_size = default_batch(self.size)


# Settings a resumed run must share with its checkpoint (the rest may change between sessions).
FIXED_ON_RESUME = ("size", "res", "data", "objective", "mask_rate", "batch_size", "grad_accum", "lr",
                   "warmup_steps", "weight_decay", "clip", "palette_size", "palette", "augment", "seed",
                   "finetune", "clf_only")
DEFAULT_EPOCHS = 1.0  # when neither --steps nor --epochs is given


def _field_defaults() -> dict:
    """The declared defaults (batch_size stays None, to be filled in for the size finally chosen)."""
    return {f.name: f.default for f in dataclasses.fields(RunConfig)}


def resolve_config(given: dict, resume: bool) -> RunConfig:
    """Defaults, then the checkpoint's own settings when resuming, then the flags given."""
    values = _field_defaults()
    values.update(given)
    if given.get("finetune") and not resume:
        path = Path(given["finetune"])
        _, meta = ck.read_meta(path)
        pre = meta.get("run")
        if pre is None:
            raise ConfigError(f"{path} is not a train.py checkpoint: fine-tune a pre-trained run")
        for key in ("size", "res", "palette_size"):
            if key in given and given[key] != pre[key]:
                raise ConfigError(f"{path} fixes --{key.replace('_', '-')} {pre[key]}: drop that flag")
        inherited = ("size", "res", "palette_size", "data", "data_dir", "objective", "mask_rate",
                     "batch_size", "seed", "cache_dir")
        values = {**_field_defaults(), **{k: pre[k] for k in inherited if k in pre},
                  "lr": pre["lr"] / 10,  # §2.3: fine-tuning uses a learning rate ~10x lower
                  "out": str(path.parent) + "-finetune", **given}
    if resume:
        path = Path(values["out"]) / "ckpt.npz"
        _, meta = ck.read_meta(path)
        saved = meta.get("run")
        if saved is None:
            raise ConfigError(f"{path} is not a pre-training checkpoint: resume a train.py run")
        for key in FIXED_ON_RESUME:
            if key in given and given[key] != saved[key]:
                raise ConfigError(f"{path} was trained with --{key.replace('_', '-')} {saved[key]}, not "
                                  f"{given[key]}: drop that flag to resume, or start a new --out")
        values = {**_field_defaults(), **saved, **given}
    return RunConfig(**values)


class Pretraining:
    """One pre-training run: data, palette, model, optimiser, and the loop with its files."""

    def __init__(self, cfg: RunConfig, resume: bool = False, log=print, init_from=None):
        """resume: continue the run saved in cfg.out. init_from: a checkpoint whose palette and
        weights start a new run (fine-tuning)."""
        self.cfg, self.log = cfg, log
        self.out = Path(cfg.out)
        self.ckpt_path = self.out / "ckpt.npz"
        if cfg.objective not in ("ar", "bert"):
            raise ConfigError(f"--objective must be ar or bert, not {cfg.objective}")
        if cfg.batch_size < 1 or cfg.grad_accum < 1:
            raise ConfigError("--batch-size and --grad-accum must be at least 1")
        if self.ckpt_path.exists() and not resume:
            raise ConfigError(f"{self.ckpt_path} exists: pass --resume to continue that run, or choose "
                              "another --out (nothing was overwritten)")
        try:
            config_for(cfg.size, cfg.res, cfg.palette_size)
        except ValueError as e:
            raise ConfigError(str(e)) from None

        arrays = ck.load_arrays(self.ckpt_path if resume else init_from) if resume or init_from else None
        t = time.time()
        self.ds = load_dataset(cfg.data, cfg.data_dir, res=cfg.res, seed=cfg.seed)
        if arrays is not None:
            if "palette" not in arrays:
                raise ConfigError(f"{self.ckpt_path if resume else init_from} holds no palette: use a "
                                  "checkpoint written by train.py")
            self.palette = Palette(arrays["palette"])
        elif cfg.palette:
            try:
                centers = load_palette(cfg.palette)
            except ValueError as e:
                raise ConfigError(str(e)) from None
            if len(centers) != cfg.palette_size:
                raise ConfigError(f"{cfg.palette} holds {len(centers)} colours, not --palette-size "
                                  f"{cfg.palette_size}: pass --palette-size {len(centers)}")
            self.palette = Palette(centers)
        else:
            self.palette = Palette(fit_palette(self.ds.train.images, k=cfg.palette_size, seed=cfg.seed))
        self.train_tokens = cached_tokens(self.ds.train.images, self.palette, cfg.cache_dir)  # (N, T)
        self.val_tokens = cached_tokens(self.ds.val.images[:cfg.eval_images], self.palette, cfg.cache_dir)
        self.data_hash = hashlib.sha256(self.train_tokens.data).hexdigest()[:16]
        self.entropy = unigram_entropy(self.train_tokens, cfg.palette_size)
        log(f"data: {self.ds.name} {cfg.res}x{cfg.res}, {len(self.ds.train)} train / {len(self.ds.val)} "
            f"val images, {cfg.palette_size}-colour palette, unigram entropy {self.entropy:.3f} nats "
            f"({time.time() - t:.1f} s)")

        self.model = ImageGPT(config_for(cfg.size, cfg.res, cfg.palette_size),
                              np.random.default_rng(cfg.seed))
        self.heads = self.make_heads(np.random.default_rng([cfg.seed, 1]))
        self.params = self.model.parameters() + [p for h in self.heads.values() for p in h.parameters()]
        self.decay = "cosine"  # §3.4: cosine decay to 0 after warm-up (fine-tuning: constant)
        self.opt = Adam(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        per_step = cfg.batch_size * cfg.grad_accum
        self.steps_per_epoch = max(1, len(self.train_tokens) // per_step)
        if cfg.steps is not None:
            self.total = cfg.steps
        else:
            self.total = max(1, math.ceil((cfg.epochs or DEFAULT_EPOCHS) * self.steps_per_epoch))
        # default warm-up: one epoch (§3.4), at most a tenth of the run so short CPU runs still decay
        self.warmup = (cfg.warmup_steps if cfg.warmup_steps is not None
                       else min(self.steps_per_epoch, max(1, self.total // 10)))
        self.eval_every = cfg.eval_every or max(1, self.total // 10)
        self.step = 0
        self.seconds_before = 0.0  # training time of earlier sessions of this run (from the checkpoint)
        self._t0 = None
        if resume:
            self._restore(arrays)
        elif arrays is not None:
            self._load_weights(arrays, init_from)
        self.stop_reason = None

    def make_heads(self, rng) -> dict:
        """Extra modules trained beside the model, by name (fine-tuning adds its classifier)."""
        return {}

    # ---- checkpoints ---------------------------------------------------------------------------
    def _load_weights(self, arrays, path, heads=False):
        """The model's weights (and the heads', when saved with them) from checkpoint arrays."""
        modules = {"model": self.model, **({f"head/{n}": h for n, h in self.heads.items()} if heads else {})}
        for prefix, module in modules.items():
            state = {k[len(prefix) + 1:]: v for k, v in arrays.items() if k.startswith(prefix + "/")}
            try:
                module.load_state_dict(state)
            except (KeyError, ValueError) as e:
                raise ConfigError(f"{path} holds another model ({e}): start a new --out") from None

    def _restore(self, arrays):
        _, meta = ck.read_config(arrays, self.ckpt_path)
        if meta.get("data_hash") != self.data_hash:
            raise ConfigError(f"{self.ckpt_path} was trained on other data (its tokens differ from "
                              f"{self.cfg.data}'s now): resume with the same data, or start a new --out")
        self._load_weights(arrays, self.ckpt_path, heads=True)
        self.opt.load_state_dict({k[len("opt/"):]: v for k, v in arrays.items() if k.startswith("opt/")})
        self.step = int(meta["step"])
        self.seconds_before = float(meta.get("train_seconds", 0.0))
        self.log(f"resumed {self.ckpt_path} at step {self.step} ({self.seconds_before / 60:.1f} min trained)")

    kind = "pretrain"

    def extra_state(self) -> dict:
        """Arrays saved beside the model's: the optimiser's moments and any heads."""
        state = {f"opt/{k}": v for k, v in self.opt.state_dict().items()}
        for name, head in self.heads.items():
            state.update({f"head/{name}/{k}": v for k, v in head.state_dict().items()})
        return state

    def train_seconds(self) -> float:
        """Training time of this run so far, earlier sessions included."""
        return self.seconds_before + (time.time() - self._t0 if self._t0 is not None else 0.0)

    def save(self, path=None, weights_only=False, **meta_extra) -> None:
        meta = {"run": dataclasses.asdict(self.cfg), "step": self.step, "total_steps": self.total,
                "data_hash": self.data_hash, "unigram_entropy": self.entropy, "kind": self.kind,
                "classes": list(self.ds.classes), "train_seconds": self.train_seconds(), **meta_extra}
        ck.save_model(path or self.ckpt_path, self.model, self.palette.centers, meta=meta,
                      extra={} if weights_only else self.extra_state())

    # ---- data and objective --------------------------------------------------------------------
    def batch(self, step: int, micro: int):
        """Tokens (B, T) and labels (B,) of micro-batch `micro` of step `step`: a function of
        (seed, step)."""
        B, N = self.cfg.batch_size, len(self.train_tokens)
        start = (step * self.cfg.grad_accum + micro) * B
        idx = [self._order(g // N)[g % N] for g in range(start, start + B)]  # endless epochs
        idx = np.asarray(idx)
        x = self.train_tokens[idx]
        if self.cfg.augment:
            res = self.cfg.res
            rng = np.random.default_rng([self.cfg.seed, step, micro, 1])
            x = augment(x.reshape(B, res, res), rng).reshape(B, -1)
        return x.astype(np.int64), self.ds.train.labels[idx]

    def _order(self, epoch: int) -> np.ndarray:
        """The order in which epoch `epoch` visits the training images (the latest one is kept)."""
        if getattr(self, "_order_epoch", None) != epoch:
            self._order_epoch = epoch
            self._order_cache = np.random.default_rng([self.cfg.seed, epoch]).permutation(
                len(self.train_tokens))
        return self._order_cache

    def loss(self, x: np.ndarray, y: np.ndarray, rng: np.random.Generator):
        """The objective on tokens x (B, T); the labels y are for fine-tuning."""
        return generative_loss(self.model, x, self.cfg.objective, self.cfg.mask_rate, rng)

    def evaluate(self, batch_size: int = 64) -> dict:
        """{"loss": mean validation loss in nats per token} (BERT: per masked token, fixed masks)."""
        total, count = 0.0, 0
        rng = np.random.default_rng([self.cfg.seed, 7919])
        with no_grad():
            for s in range(0, len(self.val_tokens), batch_size):
                x = self.val_tokens[s:s + batch_size].astype(np.int64)
                total += self.loss(x, None, rng).item() * len(x)
                count += len(x)
        return {"loss": total / max(count, 1)}

    def describe_eval(self, metrics: dict) -> str:
        val = metrics["loss"]
        return (f"step {self.step}: val loss {val:.4f} nats/token ({val * NATS_TO_BITS:.3f} bits), "
                f"unigram {self.entropy:.3f}")

    def after_eval(self, metrics: dict) -> None:
        """Called after each evaluation (fine-tuning keeps its best checkpoint and stops early)."""

    def finish(self) -> None:
        """Called once the last step is done (pre-training draws samples.png)."""
        self.write_samples()

    # ---- the loop ------------------------------------------------------------------------------
    def train(self, on_step=None) -> str:
        """Run to the last step, the time budget, or an interrupt; returns why it stopped."""
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        metrics_path = self.out / "metrics.jsonl"
        self._trim_metrics(metrics_path)
        params = self.params
        tokens_per_step = cfg.batch_size * cfg.grad_accum * self.model.config.n_ctx
        self.log(f"model: {cfg.size} ({self.model.num_parameters() / 1e6:.2f}M parameters), "
                 f"objective {cfg.objective}, {tokens_per_step} tokens per step "
                 f"({cfg.batch_size} x {cfg.grad_accum} images), {self.total} steps "
                 f"({self.total / self.steps_per_epoch:.2f} epochs), warm-up {self.warmup}, lr {cfg.lr:g}")
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        t0 = last_ckpt = self._t0 = time.time()
        first_step = self.step
        bar = tqdm(total=self.total, initial=self.step, unit="step", dynamic_ncols=True, desc="train",
                   smoothing=0)  # ETA from the whole run's rate, evaluations included
        try:
            with open(metrics_path, "a") as metrics:
                while self.step < self.total and self.stop_reason is None:
                    t_step = time.time()
                    lr = lr_at(self.step, cfg.lr, self.warmup, self.total, self.decay)
                    loss_sum = 0.0
                    for micro in range(cfg.grad_accum):
                        rng = np.random.default_rng([cfg.seed, self.step, micro, 2])
                        x, y = self.batch(self.step, micro)
                        loss = self.loss(x, y, rng)
                        loss.backward(np.array(1.0 / cfg.grad_accum, dtype=loss.dtype))
                        loss_sum += loss.item() / cfg.grad_accum
                        del loss  # free this graph before the next forward
                    if not math.isfinite(loss_sum):
                        raise TrainingDiverged(
                            f"the loss became {loss_sum} at step {self.step + 1}; {self.ckpt_path} keeps "
                            "the last good weights: resume with a lower --lr or a tighter --clip")
                    grad_norm = clip_grad_norm(params, cfg.clip)
                    self.opt.step(lr)
                    self.opt.zero_grad()
                    self.step += 1
                    tok_s = tokens_per_step / (time.time() - t_step)
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss_sum:.3f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}")
                    if self.step == first_step + 3 and self.step < self.total:
                        per = (time.time() - t0) / 3
                        self.log(f"~{per:.2f} s per step: {per * self.steps_per_epoch / 60:.1f} min per "
                                 f"epoch, {per * (self.total - self.step) / 60:.1f} min to go")
                    if self.step % cfg.log_every == 0 or self.step == self.total:
                        self._write(metrics, kind="train", loss=loss_sum, lr=lr, grad_norm=grad_norm,
                                    tokens_per_s=tok_s, elapsed_s=time.time() - t0)
                    if self.step % self.eval_every == 0 or self.step == self.total:
                        val = self.evaluate()
                        self._write(metrics, kind="eval", **val, elapsed_s=time.time() - t0)
                        bar.write(self.describe_eval(val))
                        if cfg.snapshots:
                            self.save(self.out / "snapshots" / f"step{self.step:07d}.npz", weights_only=True,
                                      val_loss=val["loss"])
                        self.after_eval(val)
                    if on_step is not None:
                        on_step(self)
                    if cfg.time_budget is not None and self.train_seconds() > cfg.time_budget * 60:
                        self.stop_reason = "time budget"
                    if time.time() - last_ckpt > cfg.ckpt_every * 60 and self.stop_reason is None:
                        self.save()
                        last_ckpt = time.time()
        finally:
            bar.close()
            for s, handler in previous.items():
                signal.signal(s, handler)
        self.save()
        self.plot_loss()
        if self.step >= self.total or self.stop_reason in ("early stop", "time budget"):
            self.finish()  # a spent budget ends the run as planned: its results are written too
        if self.step >= self.total or self.stop_reason == "early stop":
            self.log(f"done: {self.step} steps in {(time.time() - t0) / 60:.1f} min; wrote {self.ckpt_path}")
            return "done"
        self.log(f"stopped at step {self.step} of {self.total} ({self.stop_reason}); saved "
                 f"{self.ckpt_path}. Resume with: python train.py --resume --out {self.out}")
        return self.stop_reason

    def _on_signal(self, signum, frame):
        if self.stop_reason is not None:  # a second Ctrl-C: stop now (the checkpoint is atomic)
            raise KeyboardInterrupt
        self.stop_reason = "interrupted"

    def _write(self, f, **record):
        f.write(json.dumps({"step": self.step, **record}) + "\n")
        f.flush()

    def _trim_metrics(self, path: Path) -> None:
        """Drop lines logged after the checkpoint we resume from (a run killed without saving)."""
        if path.exists():
            lines = [l for l in path.read_text().splitlines() if l.strip()]
            keep = [l for l in lines if json.loads(l)["step"] <= self.step]
            path.write_text("".join(l + "\n" for l in keep))

    # ---- pictures ------------------------------------------------------------------------------
    def plot_loss(self) -> None:
        records = [json.loads(l) for l in (self.out / "metrics.jsonl").read_text().splitlines() if l]
        series = {}
        for kind, label in (("train", "train"), ("eval", "validation")):
            pts = [(r["step"], r["loss"]) for r in records if r["kind"] == kind]
            if pts:
                series[label] = tuple(zip(*pts))
        if series:
            line_chart(series, self.out / "loss.png", title=f"{self.cfg.size} on {self.cfg.data} "
                       f"{self.cfg.res}x{self.cfg.res}, {self.cfg.objective} loss", xlabel="step",
                       ylabel="nats per token", hlines={f"unigram entropy {self.entropy:.2f}": self.entropy})

    def write_samples(self) -> None:
        if self.cfg.objective != "ar" or self.cfg.samples < 1:
            if self.cfg.objective != "ar":
                self.log("no samples.png: a BERT model has no raster-order sampler")
            return
        tokens = generate(self.model, self.cfg.samples, np.random.default_rng(self.cfg.seed))
        images = self.palette.decode(tokens)
        save_png(image_grid(images, ncols=8, scale=max(1, 96 // self.cfg.res)), self.out / "samples.png")
