"""§2.4 The features a linear probe reads: average-pooled n^l of every layer, from a frozen model.

Legend: N images, L layers, C width, T positions, k layers side by side.

    f^l = (1/T) sum_t n^l_t          the paper's f^l = <n^l_i>_i, for 0 <= l <= L: n^l = norm(h^l),
                                      the input to block l's attention (l < L), and the final norm n^L

For an AR model the images go in as in pre-training (SOS, then all but the last pixel); a BERT model
sees its inputs masked as in pre-training (§4.6: "we must also mask them at evaluation time to keep
inputs in-distribution"), optionally averaged over several random masks (departure: the paper
samples 5 masks and "take[s] the modal prediction"; averaging the features keeps one linear probe).
Features are cached on disk (files.store_cached), keyed by the caller.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from .files import load_cached, store_cached
from .objectives import image_losses, model_inputs
from .parallel import Solo, batches
from .sizes import passes
from .streams import generator
from .tensor import no_grad


def extract_features(model, tokens: np.ndarray, objective: str, batch_size: int, mask_rate: float | None = None,
                     n_masks: int = 1, seed: int = 0, desc: str = "features", comm: Solo | None = None,
                     fair_share=None, upto: int | None = None):
    """tokens (N, T) -> (pooled features (N, L + 1, C) float32, each image's generative loss (N,)
    float64 from the same pass: objectives.image_losses). A batch (batch_size images: the unit of
    progress, of BERT's masks and of the work shared out among MPI ranks, whose results are summed
    into every rank) goes through no-grad forward passes of sizes.images_per_pass images at most.
    upto = k < L: the forward pass stops at n^k: features (N, k + 1, C), and no losses (None).
    mask_rate: BERT's (None for AR); n_masks: BERT's features averaged over that many masks
    (departure: §4.6 takes the modal prediction of 5). fair_share (threads.FairShare): adapt the
    thread count to the machine's load after each batch."""
    cfg, comm = model.config, comm or Solo()
    upto = None if upto is None or upto >= cfg.n_layer else upto
    feats = np.zeros((len(tokens), (cfg.n_layer if upto is None else upto) + 1, cfg.n_embd), np.float32)
    losses = np.zeros(len(tokens))
    repeats = n_masks if objective == "bert" else 1  # AR inputs are not random: one pass is the mean
    with no_grad():
        for b, rows in batches(len(tokens), batch_size, comm, desc):
            x = np.asarray(tokens[rows], dtype=np.int64)                                # (B, T)
            rng = generator(seed, "probe_masks", b)
            acc, loss = np.zeros((len(x),) + feats.shape[1:], np.float32), np.zeros(len(x))
            for _ in range(repeats):
                inputs, causal, mask = model_inputs(x, cfg.sos, objective, mask_rate, rng)
                for p in passes(len(x), cfg):                     # at most images_per_pass images at once
                    m = None if mask is None else mask[p]
                    logits, fs = model.forward_features(inputs[p], causal, m, upto,
                                                        pool=lambda n: n.data.mean(axis=1))  # L+1 x (b, C)
                    acc[p] += np.stack(fs, axis=1)                                  # (b, L+1, C)
                    if logits is not None:
                        loss[p] += image_losses(logits.data, x[p], m)               # (b,)
            feats[rows], losses[rows] = acc / repeats, loss / repeats
            if fair_share is not None:
                fair_share.update()
    if fair_share is not None:
        fair_share.reset()  # the fits after this run on as many threads as the process has (fan_out)
    return comm.allreduce_sum(feats), (comm.allreduce_sum(losses) if upto is None else None)


def seconds_per_image(model, tokens: np.ndarray, objective: str, mask_rate, upto, n: int = 4) -> float:
    """The time extract_features takes per image, from a pass over n of the images after one that
    warms up (compiles) the kernels: what a probe announces before it starts."""
    x = tokens[:n]
    extract_features(model, x[:1], objective, 1, mask_rate, upto=upto)
    t = time.perf_counter()
    extract_features(model, x, objective, len(x), mask_rate, upto=upto)
    return (time.perf_counter() - t) / max(len(x), 1)


def side_by_side(F: np.ndarray, layers) -> np.ndarray:
    """Pooled features (N, L+1, C) of the given layers next to each other -> (N, k C): the probe's
    --concat and fine-tuning's --pool-layer with several layers."""
    return F[:, list(layers)].reshape(len(F), -1)


def shared_cached(paths: tuple, compute, comm: Solo) -> tuple:
    """Arrays computed together (compute() returns one per path), cached at `paths` for every rank:
    rank 0 checks the cache and says whether it holds them all; if not, all ranks compute them
    together (compute is collective) and rank 0 stores them."""
    arrays = [load_cached(p) for p in paths] if comm.is_root else []
    hit = comm.broadcast(np.array([all(a is not None for a in arrays)], dtype=np.int64))[0]
    if hit:
        return tuple(arrays) if comm.is_root else tuple(load_cached(p) for p in paths)
    arrays = compute()
    if comm.is_root:
        for path, array in zip(paths, arrays):
            store_cached(path, array)
    return tuple(arrays)


def cached_features(stem: Path, model, tokens: np.ndarray, comm: Solo, **kw) -> tuple:
    """extract_features(model, tokens, comm=comm, **kw) -> (features, per-image losses), cached as
    <stem>.npy and <stem>-loss.npy (shared_cached); a pass stopped below the top (upto) has no
    losses (None) and caches its features alone."""
    upto = kw.get("upto")
    if upto is not None and upto < model.config.n_layer:
        return shared_cached((Path(f"{stem}.npy"),), lambda: extract_features(model, tokens, comm=comm, **kw)[:1],
                             comm) + (None,)
    return shared_cached((Path(f"{stem}.npy"), Path(f"{stem}-loss.npy")),
                         lambda: extract_features(model, tokens, comm=comm, **kw), comm)
