"""§3.1-§3.2 for one run: the dataset, its palette and its tokens, ready for the training loop.

Legend: N images, T = res^2 tokens, V palette size.

    images (N, res, res, 3) uint8  --palette-->  tokens (N, T) uint16 in raster order

The palette is, in this order of precedence: the one saved in the checkpoint the run starts from
(resume, fine-tuning: the model's tokens must mean the same colours), a palette file (--palette, e.g.
OpenAI's released clusters), or k-means fitted on the training images (§3.2). --palette-size is
k, the most colours: images with fewer distinct colours get one token per colour, and the model's
vocabulary V is the palette's length. Tokens are cached on disk (data.cached_tokens).

Which images each evaluation scores is the run's Plan's (runconfig.plan): the validation split's
first plan.n_eval, or, when fine-tuning on data without a test split, the last plan.n_eval training
images, held out from training.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace

import numpy as np

from .data import Dataset, Split, cached_tokens
from .errors import ConfigError
from .files import array_digest
from .objectives import unigram_entropy
from .palette import Palette, fit_palette, load_palette
from .parallel import Solo
from .runconfig import Plan, RunConfig


@dataclass
class RunData:
    ds: Dataset                # its train split: the images trained on (held-out ones removed)
    palette: Palette
    train_tokens: np.ndarray   # (N_train, T) uint16
    val_tokens: np.ndarray     # (n_eval, T) uint16: the images each evaluation scores
    val_labels: np.ndarray     # (n_eval,) int64
    data_hash: str             # identifies the training tokens: a resumed run must see the same
    entropy: float             # unigram entropy of the training tokens, nats: the bar to beat


def prepare_data(cfg: RunConfig, plan: Plan, ds: Dataset, start: dict | None, start_path=None, log=print,
                 comm: Solo | None = None) -> RunData:
    """Choose the palette for the loaded dataset ds (start: the arrays of the checkpoint the run
    starts from, or None) and quantise the training and evaluated images. Under MPI rank 0 fits
    the palette and fills the token cache; the others receive the palette and read the cache."""
    comm, t = comm or Solo(), time.time()
    palette = _choose_palette(cfg, ds, start, start_path, comm)
    held_out = plan.eval_on != "validation"
    with comm.root_first():  # rank 0 fills the token cache, the others then read it
        train_tokens = cached_tokens(ds.train.images, palette, cfg.cache_dir)              # (N, T)
        val_tokens = None if held_out else cached_tokens(ds.val.images[:plan.n_eval], palette, cfg.cache_dir)
    if held_out:  # the last n_eval training images choose the checkpoint; the rest are trained on
        keep = plan.n_train
        val_tokens, val_labels = train_tokens[keep:], ds.train.labels[keep:]
        full = ds.full_train[:keep] if ds.full_train is not None else None
        ds = replace(ds, train=Split(ds.train.images[:keep], ds.train.labels[:keep]), full_train=full)
        train_tokens = train_tokens[:keep]
    else:
        val_labels = ds.val.labels[:plan.n_eval]
    data = RunData(ds, palette, train_tokens, val_tokens, val_labels, array_digest(train_tokens)[:16],
                   unigram_entropy(train_tokens, len(palette)))
    fewer = (f" (the images hold only {len(palette)} distinct colours)"
             if start is None and not cfg.palette and len(palette) < cfg.palette_size else "")
    chosen = f" ({plan.n_eval} more held out to choose the checkpoint on)" if held_out else ""
    log(f"data: {ds.name} {cfg.res}x{cfg.res}, {len(ds.train)} train{chosen} / {len(ds.val)} val images, "
        f"{len(palette)}-colour palette{fewer}, unigram entropy {data.entropy:.3f} nats "
        f"({time.time() - t:.1f} s)")
    return data


def _choose_palette(cfg: RunConfig, ds, start, start_path, comm: Solo) -> Palette:
    """The checkpoint's palette, a palette file's, or k-means (fitted on rank 0 only under MPI and
    sent to the others)."""
    if start is not None:
        if "palette" not in start:
            raise ConfigError(f"{start_path} holds no palette: use a checkpoint written by train.py")
        return Palette(start["palette"])
    if cfg.palette:
        try:
            centers = load_palette(cfg.palette)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if len(centers) != cfg.palette_size:
            raise ConfigError(f"{cfg.palette} holds {len(centers)} colours, not --palette-size "
                              f"{cfg.palette_size}: pass --palette-size {len(centers)}")
        return Palette(centers)
    centers, count = np.zeros((cfg.palette_size, 3), np.float32), np.zeros(1, np.int64)
    if comm.is_root:
        fitted = fit_palette(ds.train.images, k=cfg.palette_size, seed=cfg.seed)  # (n <= k, 3)
        centers[:len(fitted)], count[0] = fitted, len(fitted)
    n = int(comm.broadcast(count)[0])  # the same n on every rank, then the n centres
    return Palette(comm.broadcast(centers)[:n])
