"""§3.4 Training settings: one run's configuration, and how it is resolved on resume and fine-tuning.

A run's settings are a RunConfig (the flags of train.py, one field each). Where they come from, in
order, each overriding the one before:

    the declared defaults  <  the data set's preset (DATA_PRESETS)  <  a pre-trained checkpoint's
    (fine-tuning, §2.3)  <  the checkpoint being resumed (--resume)  <  the flags given

A field declared None takes its value from the data set's preset, else from BASE (FINETUNE_BASE
first when fine-tuning; batch_size: from the model size, sizes.default_batch; a preset's epochs
only when --steps is not given). The one preset is the first run's: `streaks` trains at 8x8, at
batch 8 and a lower learning rate for 4 epochs, without augmentation (README, "Measured on this
machine", says why and what was tried).

A resumed run must keep the settings that shape its weights (FIXED_ON_RESUME); the others (the
length of the run, how often to evaluate, the time budget ...) may change between sessions.
Places where a default departs from the paper are marked "departure".
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

from .checkpoint import read_meta
from .sizes import SIZES, default_batch


class ConfigError(Exception):
    """A run configuration that cannot work; the message names the flag and the fix."""


@dataclass
class RunConfig:
    size: str = "micro"              # departure: a CPU size; the paper's smallest is "s" (iGPT-S)
    res: int | None = None          # BASE 16; departure: the paper trains at 32x32 to 64x64
    data: str = "streaks"
    data_dir: str = "data"
    objective: str = "ar"
    mask_rate: float = 0.15
    batch_size: int | None = None   # None: the preset's, else the size's default (sizes.py)
    grad_accum: int = 1
    lr: float | None = None         # BASE 3e-3
    steps: int | None = None
    epochs: float | None = None
    warmup_steps: int | None = None
    weight_decay: float = 0.0
    clip: float = 1.0                # departure: the paper does not clip gradients; 0 turns it off
    palette_size: int = 512          # k, the most colours: fewer when the images hold fewer
    palette: str | None = None       # a palette file to use instead of fitting one (palette.load_palette)
    augment: str | None = None      # "wrn", "crop" or "none" (data.py); BASE "crop", fine-tuning "wrn"
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
    patience: int = 5                # fine-tuning: evaluations without a better held-out accuracy
    pool_layer: list | None = None   # fine-tuning: the layers whose n^l are pooled, side by side;
                                     # None: the last alone (§2.3)
    head_from_probe: bool = False    # fine-tuning: the classifier starts from a linear probe (departure)

    def __post_init__(self):
        if isinstance(self.size, str):
            self.size = self.size.lower()  # --size S is the paper's iGPT-S
        tuning = FINETUNE_BASE if self.finetune else {}
        preset = DATA_PRESETS.get(self.data, {})
        if self.steps is not None:  # --steps sets the length: the preset's epochs would only mislead
            preset = {k: v for k, v in preset.items() if k != "epochs"}
        for name, value in {**BASE, **tuning, **preset}.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.batch_size is None:
            self.batch_size = default_batch(self.size) if self.size in SIZES else 1
        if self.pool_layer is not None:
            if not isinstance(self.pool_layer, list):  # one layer, as checkpoints before lists wrote it
                self.pool_layer = [self.pool_layer]
            if not self.pool_layer or len(set(map(str, self.pool_layer))) < len(self.pool_layer):
                raise ConfigError(f"--pool-layer {' '.join(map(str, self.pool_layer))} is not valid: it "
                                  "must name one or more different layers")
        for name, (ok, needs) in _RULES.items():
            value = getattr(self, name)
            for v in (value if isinstance(value, list) else [value]):
                if v is not None and not _valid(v, ok):
                    raise ConfigError(f"--{name.replace('_', '-')} {v} is not valid: it must be {needs}")
        if self.size not in SIZES:
            raise ConfigError(f"unknown model size '{self.size}': choose one of {', '.join(SIZES)}")
        if self.objective not in ("ar", "bert"):
            raise ConfigError(f"--objective must be ar or bert, not {self.objective}")
        if self.augment not in AUGMENTS:
            raise ConfigError(f"--augment must be one of {', '.join(AUGMENTS)}, not {self.augment}")


# The values of the fields declared None, when the data set's preset does not set them. §3.4:
# pre-training augments with random-resized crops; fine-tuning (§4.5) with the Wide-ResNet one.
BASE = {"res": 16, "lr": 3e-3, "augment": "crop"}
FINETUNE_BASE = {"augment": "wrn"}
# The first run (README quickstart): streaks at 8x8 learns all four classes in minutes at batch 8
# and lr 1.5e-3 for 4 epochs (at 16x16 and batch 16 it learned one class in the same minutes); it is
# not augmented, since a flip turns one diagonal class into the other.
DATA_PRESETS = {"streaks": {"res": 8, "batch_size": 8, "lr": 1.5e-3, "epochs": 4.0, "augment": "none"}}
AUGMENTS = ("wrn", "crop", "none")  # data.py: Wide-ResNet pad-crop-flip, full-resolution crops, none


def _valid(value, ok) -> bool:
    try:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
            and ok(value)
    except TypeError:
        return False


# The ranges of the numeric settings, checked whether they come from flags, a checkpoint or code.
MAX_PALETTE = 4096  # k-means and the nearest-colour grid grow with k; the paper uses 512
_RULES = {
    "res": (lambda v: v == int(v) and v >= 1, "a whole number of pixels >= 1"),
    "mask_rate": (lambda v: 0 < v < 1, "between 0 and 1"),
    "batch_size": (lambda v: v == int(v) and v >= 1, "a whole number >= 1"),
    "grad_accum": (lambda v: v == int(v) and v >= 1, "a whole number >= 1"),
    "lr": (lambda v: v > 0, "a finite number > 0"),
    "steps": (lambda v: v == int(v) and v >= 1, "a whole number >= 1"),
    "epochs": (lambda v: v > 0, "a finite number > 0"),
    "warmup_steps": (lambda v: v == int(v) and v >= 0, "a whole number >= 0"),
    "weight_decay": (lambda v: v >= 0, "a finite number >= 0"),
    "clip": (lambda v: v >= 0, "a finite number >= 0 (0: no clipping)"),
    "palette_size": (lambda v: v == int(v) and 2 <= v <= MAX_PALETTE,
                     f"a whole number of colours from 2 to {MAX_PALETTE} (the paper uses 512)"),
    "seed": (lambda v: v == int(v) and v >= 0, "a whole number >= 0"),
    "eval_every": (lambda v: v == int(v) and v >= 1, "a whole number >= 1"),
    "eval_images": (lambda v: v == int(v) and v >= 1, "a whole number >= 1"),
    "log_every": (lambda v: v == int(v) and v >= 1, "a whole number >= 1"),
    "ckpt_every": (lambda v: v > 0, "a finite number of minutes > 0"),
    "time_budget": (lambda v: v >= 0, "a finite number of minutes >= 0"),
    "samples": (lambda v: v == int(v) and v >= 0, "a whole number >= 0"),
    "patience": (lambda v: v == int(v) and v >= 1, "a whole number >= 1"),
    "pool_layer": (lambda v: v == int(v) and v >= 0, "a whole number >= 0 (0: the embeddings)"),
}


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
DEFAULT_EPOCHS = 1.0  # when neither --steps nor --epochs is given


def _field_defaults() -> dict:
    """The declared defaults (batch_size stays None, to be filled in for the size finally chosen)."""
    return {f.name: f.default for f in dataclasses.fields(RunConfig)}


def _saved_run(path: Path, what: str) -> dict:
    """The settings a train.py checkpoint was written with."""
    _, meta = read_meta(path)
    if not isinstance(meta.get("run"), dict):
        raise ConfigError(f"{path} is not a train.py checkpoint: {what}")
    run = dict(meta["run"])
    if isinstance(run.get("augment"), bool):  # written before augment had names
        run["augment"] = "wrn" if run["augment"] else "none"
    if isinstance(run.get("pool_layer"), int):  # written before --pool-layer took several layers
        run["pool_layer"] = [run["pool_layer"]]
    return run


def _shown(value) -> str:
    """A setting as its flag takes it: a list as its items, space-separated."""
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


def resolve_config(given: dict, resume: bool) -> RunConfig:
    """Defaults, then a pre-trained run's settings (fine-tuning), then the resumed checkpoint's own
    settings, then the flags given."""
    values = {**_field_defaults(), **given}
    if given.get("finetune") and not resume:
        path = Path(given["finetune"])
        pre = _saved_run(path, "fine-tune a pre-trained run")
        for key in ("size", "res", "palette_size"):
            if key in given and given[key] != pre[key]:
                raise ConfigError(f"{path} fixes --{key.replace('_', '-')} {pre[key]}: drop that flag")
        values = {**_field_defaults(), **{k: pre[k] for k in INHERITED_BY_FINETUNING if k in pre},
                  "lr": pre["lr"] / 10,  # §2.3: fine-tuning uses a learning rate ~10x lower
                  "out": str(path.parent) + "-finetune", **given}
    if resume:
        path = Path(values["out"]) / "ckpt.npz"
        saved = _saved_run(path, "resume a train.py run")
        defaults = _field_defaults()
        for key in FIXED_ON_RESUME:
            was = saved.get(key, defaults[key])  # a setting newer than the checkpoint: its default
            if key in given and given[key] != was:
                flag = "--" + key.replace("_", "-")
                had = f"with {flag} {_shown(was)}" if was is not None else f"without {flag}"
                raise ConfigError(f"{path} was trained {had}, not {_shown(given[key])}: drop that flag to "
                                  "resume, or start a new --out")
        kept = {k: v for k, v in saved.items() if k not in WRITTEN_PATHS}
        values = {**_field_defaults(), **kept, "out": values["out"], **given}
    try:
        return RunConfig(**values)
    except TypeError as e:  # a checkpoint's settings with unknown names
        raise ConfigError(f"settings that train.py does not know ({e}): start a new --out") from None
