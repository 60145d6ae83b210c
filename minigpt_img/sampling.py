"""Sampling from the AR model: unconditional images and completions (the paper's Figure 1).

Pixels are drawn one at a time in raster order, x_i ~ p(x_i | x_<i), with the KV cache (model.py) so
each new pixel costs one position's forward pass plus an attention read over the earlier ones. All
images in a batch are sampled together.

    p(x_i = k | x_<i) = softmax(logits / temperature)_k, restricted to the top_k largest logits
    temperature -> 0 is argmax decoding.
A completion keeps the first `given` tokens (the top rows of a real image) and samples the rest.
"""
from __future__ import annotations

import numpy as np
from tqdm import tqdm

from .kernels import logsumexp
from .model import KVCache
from .parallel import Solo


def choose(logits: np.ndarray, u: np.ndarray, temperature: float = 1.0,
           top_k: int | None = None) -> np.ndarray:
    """One token per row of logits (B, V): argmax when temperature <= 0, else a draw from the
    softmax of logits / temperature over the top_k largest logits (all when top_k is None), by
    inverting the cumulative distribution at the uniform numbers u (B,) in [0, 1)."""
    logits = np.asarray(logits, dtype=np.float64)
    if temperature <= 0:
        return logits.argmax(axis=-1)
    z = logits / temperature
    if top_k is not None and top_k < z.shape[-1]:
        kth = np.partition(z, -top_k, axis=-1)[:, -top_k][:, None]
        z = np.where(z >= kth, z, -np.inf)
    p = np.exp(z - logsumexp(z))                                               # (B, V) softmax
    return np.minimum((np.cumsum(p, axis=-1) < np.asarray(u)[:, None]).sum(axis=-1), p.shape[-1] - 1)


def generate(model, n: int, rng: np.random.Generator, temperature: float = 1.0,
             top_k: int | None = None, prefix: np.ndarray | None = None, progress: bool = False,
             rows: slice = slice(None), should_stop=None):
    """n token sequences (n, T) from the AR model. prefix (n, given) tokens are kept as they are and
    the rest is sampled (a completion); without prefix, images are sampled from nothing. rows: sample
    only these of the n sequences (the others stay 0), with the random numbers they would get if all
    n were sampled, so that processes sharing the work out draw exactly the same images.
    should_stop: checked before every pixel; when it returns True, generate returns None at once."""
    cfg = model.config
    T = cfg.n_ctx
    out = np.zeros((n, T), dtype=np.int64)
    given = 0 if prefix is None else prefix.shape[1]
    if given:
        out[:, :given] = prefix
    u = rng.random((T, n))[:, rows]                                            # one number per pixel
    mine = out[rows]                                                           # a view when rows is a slice
    n_mine = len(mine)
    if n_mine == 0:
        return out
    cache = KVCache(cfg, batch=n_mine, dtype=model.lm_head.weight.dtype)
    # read SOS and the given pixels in one pass; the last logits predict the next pixel
    first = np.concatenate([np.full((n_mine, 1), cfg.sos), mine[:, :given]], axis=1)[:, :T]
    logits = model.decode(first, cache).data[:, -1]                            # (n, V)
    for i in tqdm(range(given, T), desc="sampling pixels", unit="px", disable=not progress, leave=False):
        if should_stop is not None and should_stop():
            return None
        mine[:, i] = choose(logits, u[i], temperature, top_k)
        if i + 1 < T:
            logits = model.decode(mine[:, i:i + 1], cache).data[:, -1]         # (n, V)
    return out


def sample_shared(model, n: int, rng, temperature=1.0, top_k=None, prefix=None, progress=False,
                  comm: Solo | None = None) -> np.ndarray:
    """generate() with the n sequences shared out among the ranks in contiguous blocks and summed
    into every rank: the same images one process draws."""
    comm = comm or Solo()
    bounds = np.linspace(0, n, comm.size + 1).astype(int)
    rows = slice(bounds[comm.rank], bounds[comm.rank + 1])
    out = generate(model, n, rng, temperature, top_k, prefix, progress and comm.is_root, rows)
    if comm.size == 1:
        return out
    mine = np.zeros_like(out)
    mine[rows] = out[rows]            # each row counted once, by the rank that sampled it
    return comm.allreduce_sum(mine)


def completion_rows(model, palette, images: np.ndarray, per_image: int, frac: float,
                    rng: np.random.Generator, temperature: float = 1.0, top_k: int | None = None,
                    progress: bool = False, comm: Solo | None = None) -> np.ndarray:
    """The paper's completion figure as images: for each of the n images (n, H, W, 3) uint8 one row
    of [original, the given top part (the rest grey), per_image completions] -> (n * (2 + per_image),
    H, W, 3) uint8, row-major. The given part is the first round(frac * H) rows of pixels."""
    n, H, W, _ = images.shape
    tokens = palette.encode(images).astype(np.int64)                           # (n, T)
    given = int(round(frac * H)) * W
    prefix = np.repeat(tokens[:, :given], per_image, axis=0)                   # (n * k, given)
    samples = sample_shared(model, n * per_image, rng, temperature, top_k, prefix, progress, comm)
    completed = palette.decode(samples).reshape(n, per_image, H, W, 3)
    half = palette.decode(tokens)                                              # quantised originals
    half.reshape(n, -1, 3)[:, given:] = 128                                    # hide all but the given rows
    return np.concatenate([images[:, None], half[:, None], completed], axis=1).reshape(-1, H, W, 3)
