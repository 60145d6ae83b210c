"""§3.4 Training: one run's settings, resolved once, and every number derived from them.

A run's settings are a frozen RunConfig: the flags of train.py, one field each, declared below with
their help text (train.py builds its flags from these declarations, so `--help` shows the defaults
from here). Where a setting comes from, in order, each overriding the one before:

    the declared defaults  <  BASE (FINETUNE_BASE first when fine-tuning)  <  the data set's preset
    <  a pre-trained checkpoint's (fine-tuning, §2.3)  <  the checkpoint being resumed  <  the flags

resolve_config does this once. Once the data is loaded, plan() derives every number the loop, the
tasks and the data read (steps per epoch, total steps, warm-up, evaluation interval, which images
are evaluated, the pooled layers, each process's share of a batch) into a frozen Plan; nothing
downstream derives a default again.

A resumed run keeps the settings that shape its weights (FIXED_ON_RESUME) and the warm-up of its
plan; the others (the length of the run, how often to evaluate, the time budget ...) may change
between sessions. Places where a default departs from the paper are marked "departure".

This module imports nothing heavy at the top, so the scripts can build their flags before the
thread settings are applied and NumPy loads.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError
from .ranges import NONNEGATIVE, NONNEGATIVE_INT, NUMBER, POSITIVE, POSITIVE_INT, Range
from .sizes import SIZES, default_batch

MAX_PALETTE = 4096  # k-means and the nearest-colour grid grow with k; the paper uses 512
AUGMENTS = ("wrn", "crop", "none")  # data.py: Wide-ResNet pad-crop-flip, full-resolution crops, none
# The values of the fields declared None, when the data set's preset does not set them. §3.1:
# pre-training on ImageNet uses "lightweight data augmentation" (random-resized crops); fine-tuning on
# CIFAR "the augmentation popularized by Wide Residual Networks".
BASE = {"res": 16, "lr": 3e-3, "augment": "crop"}
FINETUNE_BASE = {"augment": "wrn"}
# Departure, the first run (README): streaks at 8x8 learns all four classes in minutes at batch 8 and lr 1.5e-3
# for 4 epochs (at 16x16 and batch 16 it learned one class in the same minutes); it is not augmented,
# since a flip turns one diagonal class into the other.
DATA_PRESETS = {"streaks": {"res": 8, "batch_size": 8, "lr": 1.5e-3, "epochs": 4.0, "augment": "none"}}
EVAL_BATCH = 64  # images per batch of evaluations, probe features, fine-tuning's start (their
#                 forward passes take at most sizes.images_per_pass images at once)
PAPER_SIZES = ("s", "m", "l", "xl")  # the paper's iGPT-S/M/L/XL (sizes.py)
PAPER_SIZES_DATA = "cifar10"  # what they train on when --data is not given: real images, as docs/results.md
DEFAULT_EPOCHS = 1.0  # when neither --steps nor --epochs (nor a preset) says how long
FINETUNE_LR_FACTOR = 0.1  # §4.5: "the optimal learning rate on the joint training objective is often
                          # an order of magnitude smaller than that for pre-training"


def setting(default, help: str, range: Range | None = None, choices=None, shown: str | None = None):
    """A RunConfig field: its default, its flag's help, the range or choices its values must be in,
    and (shown) how --help states a default computed elsewhere."""
    return field(default=default, metadata={"help": help, "range": range, "choices": choices, "shown": shown})


@dataclass(frozen=True)
class RunConfig:
    # -- the model and its data (§3.1-§3.3)
    size: str = setting("micro", "model size: " + ", ".join(SIZES), choices=tuple(SIZES))  # departure: a CPU
    #                                                  size by default; the paper's smallest is "s" (iGPT-S)
    res: int | None = setting(None, "image side in pixels after box-filter downsampling (§3.2)",
                              POSITIVE_INT)  # departure: the paper trains at 32x32 to 64x64
    data: str = setting("streaks", "streaks | shapes | cifar10 | cifar100 | stl10 | a folder of class folders",
                        shown=f"streaks; {PAPER_SIZES_DATA} for the paper's sizes {', '.join(PAPER_SIZES)}")
    data_dir: str = setting("data", "folder holding the dataset files")
    palette_size: int = setting(512, "k-means k, the most colours; images with fewer distinct colours get one "
                                "token each", Range(int, 2, MAX_PALETTE, what="a whole number of colours from 2 "
                                                    f"to {MAX_PALETTE} (the paper uses 512)"))
    palette: str | None = setting(None, "use this palette instead of fitting one: a (k, 3) .npy in [-1, 1] or a "
                                  "Hugging Face preprocessor_config.json with 'clusters' (OpenAI's released "
                                  "palette)", shown="fit one")
    augment: str | None = setting(None, "wrn: reflection-pad, random crop and flip (the paper's CIFAR fine-tuning "
                                  "augmentation); crop: random crops of the full-resolution image, then "
                                  "downsampled (the paper's pre-training augmentation); none", choices=AUGMENTS)
    # -- the objective (§2.1)
    objective: str = setting("ar", "ar (autoregressive) or bert (masked)", choices=("ar", "bert"))
    mask_rate: float = setting(0.15, "BERT: probability a position is masked (§2.1: \"probability 0.15\")",
                               Range(float, 0.0, 1.0, low_open=True, what="between 0 and 1"))
    # -- the optimisation (§3.4)
    batch_size: int | None = setting(None, "images per micro-batch", POSITIVE_INT,
                                     shown="by size: " + ", ".join(f"{n} {s}" for s, n in
                                                                   ((s, default_batch(s)) for s in SIZES)))
    grad_accum: int = setting(1, "micro-batches per optimiser step", POSITIVE_INT)
    lr: float | None = setting(None, "peak learning rate of Adam", NUMBER(0.0, low_open=True))
    steps: int | None = setting(None, "optimiser steps in the run", POSITIVE_INT, shown="from --epochs")
    epochs: float | None = setting(None, "passes over the training images when --steps is not given", POSITIVE,
                                   shown=f"{DEFAULT_EPOCHS:g}")
    warmup_steps: int | None = setting(None, "linear warm-up steps", NONNEGATIVE_INT,
                                       shown="one epoch, at most 10%% of the run")  # departure: the cap
    weight_decay: float = setting(0.0, "decoupled weight decay (the paper uses none)", NONNEGATIVE)
    clip: float = setting(1.0, "global gradient-norm clip, 0 for none", NONNEGATIVE)  # departure: the paper mentions no gradient clipping
    seed: int = setting(0, "seed of init, data order, augmentation, palette", NONNEGATIVE_INT)
    # -- where it goes and how it is watched
    out: str = setting("runs/default", "run folder for ckpt.npz, metrics.jsonl, loss.png, samples.png",
                       shown="runs/default; fine-tuning: the pre-trained run's folder + -finetune")
    cache_dir: str = setting("runs/cache", "where quantised tokens and features are cached")
    eval_every: int | None = setting(None, "steps between evaluations", POSITIVE_INT, shown="10 per run")
    eval_images: int = setting(512, "images per evaluation", POSITIVE_INT)
    log_every: int = setting(10, "steps between metrics.jsonl lines", POSITIVE_INT)
    ckpt_every: float = setting(10.0, "minutes between checkpoints",
                                NUMBER(0.0, low_open=True, what="a finite number of minutes > 0"))
    time_budget: float | None = setting(None, "stop cleanly after this many minutes of training, counted over all "
                                        "sessions of a resumed run", NUMBER(0.0, what="a finite number of "
                                                                            "minutes >= 0"), shown="none")
    snapshots: bool = setting(False, "also keep the weights at every evaluation in --out/snapshots, to probe them "
                              "along the run (§4.2)")
    samples: int = setting(16, "images in samples.png at the end", NONNEGATIVE_INT)
    # -- fine-tuning (§2.3, §4.5)
    finetune: str | None = setting(None, "§2.3: fine-tune this pre-trained ckpt.npz with a classifier",
                                   shown="pre-train")
    clf_only: bool = setting(False, "fine-tuning: train on L_CLF alone, without L_GEN")
    patience: int = setting(5, "fine-tuning: stop after this many evaluations without a better held-out "
                            "accuracy", POSITIVE_INT)
    pool_layer: list | None = setting(None, "fine-tuning: pool the features n^l of these layers (0: the embeddings) "
                                      "for the classifier, side by side as probe.py --concat",
                                      Range(int, 0, what="a whole number >= 0 (0: the embeddings)"),
                                      shown="the last, n^L, as the paper")  # departure when given
    head_from_probe: bool = setting(False, "fine-tuning: start the classifier from a linear probe of the pooled "
                                    "features instead of zero (departure: LP-FT)")

    def __post_init__(self):
        """Check every value that is set (the flags' parser checked them too: settings also come
        from checkpoints and code)."""
        for f in dataclasses.fields(self):
            value, meta = getattr(self, f.name), f.metadata
            if value is None:
                continue
            items = value if isinstance(value, list) else [value]
            flag = "--" + f.name.replace("_", "-")
            if meta["range"] is not None:
                for v in items:
                    if not meta["range"].ok(v):
                        raise ConfigError(f"{flag} {v} is not valid: it must be {meta['range'].what}")
            if meta["choices"] is not None and value not in meta["choices"]:
                raise ConfigError(f"{flag} {value} is not valid: choose one of {', '.join(meta['choices'])}")
        if not str(self.data).strip():
            raise ConfigError("--data names no data set: give streaks, shapes, cifar10, cifar100, stl10 or a folder")
        if self.pool_layer is not None and (not self.pool_layer or len(set(self.pool_layer)) < len(self.pool_layer)):
            raise ConfigError(f"--pool-layer {_shown(self.pool_layer)} is not valid: it must name one or more "
                              "different layers")


# Settings a resumed run must share with its checkpoint (the rest may change between sessions).
FIXED_ON_RESUME = ("size", "res", "data", "objective", "mask_rate", "batch_size", "grad_accum",
                   "warmup_steps", "weight_decay", "palette_size", "palette", "augment", "seed",
                   "finetune", "clf_only", "pool_layer", "head_from_probe")
# Settings a resumed run may change, to recover from a divergence; the change is logged and recorded
# in the checkpoint ("changes"), and the run is no longer bit-identical to an uninterrupted one.
CHANGEABLE_ON_RESUME = ("lr", "clip")
# Paths a run writes to. They come from the flags (or the defaults), never from a checkpoint: a
# crafted checkpoint must not make a run write outside the folders its user chose.
WRITTEN_PATHS = ("out", "cache_dir")
# Settings a fine-tuning run takes from the pre-trained run unless given.
INHERITED_BY_FINETUNING = ("size", "res", "palette_size", "data", "data_dir", "objective", "mask_rate",
                           "batch_size", "seed")


def declared(name: str):
    """The declared default of a RunConfig field."""
    return next(f.default for f in dataclasses.fields(RunConfig) if f.name == name)


def default_text(f) -> str:
    """How --help states field f's default: its declared value, or BASE's with each preset's."""
    if f.metadata["shown"] is not None:
        text = f.metadata["shown"]
    elif f.default is not None:
        text = ("on" if f.default else "off") if isinstance(f.default, bool) else str(f.default)
    else:
        text = f"{BASE[f.name]:g}" if isinstance(BASE[f.name], float) else str(BASE[f.name])
        if f.name in FINETUNE_BASE:
            text += f" when pre-training, {FINETUNE_BASE[f.name]} when fine-tuning"
    if f.name == "lr":
        text += f"; fine-tuning: the pre-trained run's x {FINETUNE_LR_FACTOR:g}"
    for data, preset in DATA_PRESETS.items():
        if f.name in preset:
            text += f"; {preset[f.name]:g} for {data}" if isinstance(preset[f.name], float) else \
                f"; {preset[f.name]} for {data}"
    return text


def add_flags(ap) -> None:
    """One flag per RunConfig field on the argparse parser ap, with its range, choices and default
    (the parser should use argument_default=SUPPRESS, so that flags not given stay absent)."""
    for f in dataclasses.fields(RunConfig):
        meta, flag = f.metadata, "--" + f.name.replace("_", "-")
        kw = {"help": f"{meta['help']} (default {default_text(f)})"}
        if f.default is False:
            kw["action"] = "store_true"
        else:
            kw["type"] = meta["range"] if meta["range"] is not None else str
            if meta["choices"] is not None:
                kw["choices"] = meta["choices"]
        if f.name == "pool_layer":
            kw["nargs"] = "+"
        if f.name == "size":
            kw["type"] = str.lower  # --size S is the paper's iGPT-S
        ap.add_argument(flag, **kw)


def _shown(value) -> str:
    """A setting as its flag takes it: a list as its items, space-separated."""
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


def _pretrained_run(name) -> dict:
    """The settings a fine-tune takes from the model it starts from: a train.py checkpoint's own, or,
    for a Hugging Face folder or hub name (hub.py), its size, resolution and palette from config.json,
    the paper's learning rate grid's 3e-3 as the pre-training rate, and CIFAR-10 as the data."""
    import json

    from .hub import locate

    path = locate(name)
    if not path.is_dir():
        return _saved_run(path, "fine-tune a pre-trained run")
    try:
        hf = json.loads((path / "config.json").read_text())
        shape = (hf["n_layer"], hf["n_embd"], hf["n_head"])
        n_px = int(round(hf["n_positions"] ** 0.5))
        vocab = hf["vocab_size"] - 1
    except (OSError, ValueError, TypeError, KeyError, OverflowError) as e:
        raise ConfigError(f"{path}/config.json is not an ImageGPT config ({type(e).__name__}: {e})") from None
    size = next((s for s, spec in SIZES.items() if tuple(spec[:3]) == shape), None)
    if size is None:
        raise ConfigError(f"{name} has {shape[0]} layers of width {shape[1]} with {shape[2]} heads, none of the sizes "
                          f"{', '.join(SIZES)}: fine-tuning builds its model by size")
    return {"size": size, "res": n_px, "palette_size": vocab, "lr": BASE["lr"], "objective": "ar",
            "data": PAPER_SIZES_DATA}


def _finetune_out(name: Path) -> str:
    """Where a fine-tune writes by default: beside the run it starts from (<run>-finetune), or, for a
    Hugging Face folder or hub name, runs/<its name>-finetune."""
    if name.suffix == ".npz":
        return str(name.parent) + "-finetune"
    return str(Path(declared("out")).parent / (str(name).replace("/", "--").replace("@", "-") + "-finetune"))


def _saved_run(path: Path, what: str) -> dict:
    """The settings a train.py checkpoint was written with (in the names of today's settings)."""
    from .checkpoint import read_meta

    _, meta = read_meta(path)
    if not isinstance(meta.get("run"), dict):
        raise ConfigError(f"{path} is not a train.py checkpoint: {what}")
    run = dict(meta["run"])
    if isinstance(run.get("augment"), bool):  # written before augment had names
        run["augment"] = "wrn" if run["augment"] else "none"
    run["pool_layer"] = _layers(run.get("pool_layer"))
    return run


def _layers(value):
    """--pool-layer as a list: checkpoints written before it took several layers (and code) give one."""
    return [value] if isinstance(value, int) else value


def with_presets(values: dict) -> dict:
    """The fields still None filled in: from the data set's preset, else BASE (FINETUNE_BASE first
    when fine-tuning); the batch size from the model size. A preset's epochs only when --steps is
    not given (then they would only mislead), else DEFAULT_EPOCHS."""
    values = dict(values)
    if isinstance(values.get("size"), str):
        values["size"] = values["size"].lower()
    values["pool_layer"] = _layers(values.get("pool_layer"))
    preset = dict(DATA_PRESETS.get(values["data"], {}))
    if values.get("steps") is not None:
        preset.pop("epochs", None)
    tuning = FINETUNE_BASE if values.get("finetune") else {}
    for name, value in {**BASE, **tuning, **preset}.items():
        if values.get(name) is None:
            values[name] = value
    if values.get("steps") is None and values.get("epochs") is None:
        values["epochs"] = DEFAULT_EPOCHS
    if values.get("batch_size") is None and values["size"] in SIZES:
        values["batch_size"] = default_batch(values["size"])
    return values


def resolve_config(given: dict, resume: bool = False) -> RunConfig:
    """The run's settings: defaults, then a pre-trained run's settings (fine-tuning), then the
    resumed checkpoint's own settings, then the flags given (the module docstring)."""
    defaults = {f.name: f.default for f in dataclasses.fields(RunConfig)}
    values = {**defaults, **given}
    if given.get("finetune") and not resume:
        path = Path(given["finetune"])
        pre = _pretrained_run(given["finetune"])
        for key in ("size", "res", "palette_size"):
            if key in given and given[key] != pre[key]:
                raise ConfigError(f"{path} fixes --{key.replace('_', '-')} {pre[key]}: drop that flag")
        values = {**defaults, **{k: pre[k] for k in INHERITED_BY_FINETUNING if k in pre},
                  "lr": pre["lr"] * FINETUNE_LR_FACTOR, "out": _finetune_out(path), **given}
    if resume:
        path = Path(values["out"]) / "ckpt.npz"
        saved = _saved_run(path, "resume a train.py run")
        for key in FIXED_ON_RESUME:
            was = saved.get(key, defaults[key])  # a setting newer than the checkpoint: its default
            if key in given and given[key] != was:
                flag = "--" + key.replace("_", "-")
                had = f"with {flag} {_shown(was)}" if was is not None else f"without {flag}"
                raise ConfigError(f"{path} was trained {had}, not {_shown(given[key])}: drop that flag to "
                                  "resume, or start a new --out")
        kept = {k: v for k, v in saved.items() if k not in WRITTEN_PATHS}
        values = {**defaults, **kept, "out": values["out"], **given}
    elif not given.get("finetune") and "data" not in given and str(values["size"]).lower() in PAPER_SIZES:
        values["data"] = PAPER_SIZES_DATA  # the first run's toy data and preset are for the small sizes
    unknown = set(values) - set(defaults)
    if unknown:  # a checkpoint's settings with names train.py does not know
        raise ConfigError(f"settings that train.py does not know ({', '.join(sorted(unknown))}): start a new --out")
    return RunConfig(**with_presets(values))


# ---- the numbers derived from the settings and the data -------------------------------------------
@dataclass(frozen=True)
class Plan:
    """Every number a run derives from its settings and its data, computed by plan() alone."""
    n_train: int                # training images the run trains on
    eval_on: str                # "validation" or "held-out training": the images each evaluation scores
    n_eval: int                 # how many of them
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    eval_every: int
    decay: str                  # after warm-up: "cosine" (pre-training) or "constant" (fine-tuning)
    pool_layers: tuple          # fine-tuning: the layers whose n^l the classifier pools; () when pre-training
    per_process: int            # images of each micro-batch per process (MPI)


def plan(cfg: RunConfig, n_train: int, n_val: int, has_test: bool, n_layer: int, processes: int = 1,
         saved: dict | None = None) -> Plan:
    """The run's Plan for a data set of n_train training and n_val validation images (and a test set
    or not), a model of n_layer blocks and `processes` MPI processes. saved: the plan of the
    checkpoint being resumed, whose warm-up the run keeps.

    Evaluation scores the validation split's first --eval-images, except when fine-tuning on data
    without a test split: the validation split then stands in for the test set and must choose
    nothing, so fine-tuning chooses its checkpoint (early stopping, §3.4) on a held-out slice of the
    training images instead (the last min(--eval-images, 10%) of them, already shuffled), as the
    linear probe chooses its lambda, and trains on the rest."""
    unresolved = [k for k in ("res", "lr", "batch_size", "augment") if getattr(cfg, k) is None]
    if cfg.steps is None and cfg.epochs is None:
        unresolved.append("epochs")
    if unresolved:
        raise ValueError(f"settings {unresolved} were never resolved: build a RunConfig with resolve_config")
    if cfg.batch_size % processes:
        raise ConfigError(f"--batch-size {cfg.batch_size} does not divide among {processes} processes: "
                          f"choose a multiple of {processes}")
    hold_out = cfg.finetune is not None and not has_test
    if hold_out and n_train < 2:
        raise ConfigError(f"{n_train} training image: fine-tuning needs at least 2 (one to hold out for "
                          "choosing the checkpoint); add images")
    n_eval = min(cfg.eval_images, max(1, n_train // 10)) if hold_out else min(cfg.eval_images, n_val)
    n_trained = n_train - n_eval if hold_out else n_train
    per_epoch = max(1, n_trained // (cfg.batch_size * cfg.grad_accum))
    total = cfg.steps if cfg.steps is not None else max(1, math.ceil(cfg.epochs * per_epoch))
    if cfg.warmup_steps is not None:
        warmup = cfg.warmup_steps
    elif saved and isinstance(saved.get("warmup_steps"), int):
        warmup = saved["warmup_steps"]  # the schedule the weights were trained on so far
    else:  # §3.4: "warmed up for one epoch"; departure: at most a tenth of the run, so short CPU runs decay
        warmup = min(per_epoch, max(1, total // 10))
    if cfg.finetune is not None:
        pool = tuple(cfg.pool_layer) if cfg.pool_layer is not None else (n_layer,)  # §2.3: n^L
        if max(pool) > n_layer:
            raise ConfigError(f"--pool-layer {max(pool)}: {cfg.size} has layers 0 to {n_layer} (0: the "
                              f"embeddings, {n_layer}: the final norm's output)")
    else:
        pool = ()
    return Plan(n_train=n_trained, eval_on="held-out training" if hold_out else "validation", n_eval=n_eval,
                steps_per_epoch=per_epoch, total_steps=total, warmup_steps=warmup,
                eval_every=cfg.eval_every or max(1, total // 10),
                decay="constant" if cfg.finetune else "cosine",  # §3.4: "we do not employ a cosine schedule"
                pool_layers=pool, per_process=cfg.batch_size // processes)
