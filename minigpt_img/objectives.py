"""§2.1 Pre-training objectives: autoregressive (AR) and BERT.

Legend: B batch, T = n_px^2 tokens, V palette size; x (B, T) palette tokens in raster order.

AR (§2.1, the paper's main objective): each pixel is predicted from the pixels before it,

    L_AR = E_x [ -log p(x) ] = E_x [ sum_i -log p(x_i | x_1 .. x_{i-1}) ] / T       (nats per token)

The model reads [SOS, x_1, .., x_{T-1}] (input shifted right behind the start-of-sequence token) with
a causal mask, and position i's logits predict x_i.

BERT (§2.1): a set M of positions is masked, each independently with probability 0.15; the model
sees x with the token embeddings at M zeroed (released iGPT code: h * (1 - M)), attends without a
mask, and predicts the masked tokens from everything else,

    L_BERT = E_x E_M [ sum_{i in M} -log p(x_i | x_[not M]) ] / |M|                  (masked only)

Losses are in nats per token; bits per token = nats / ln 2.
"""
from __future__ import annotations

import math

import numpy as np

from . import ops

NATS_TO_BITS = 1.0 / math.log(2.0)


def ar_inputs(x: np.ndarray, sos: int) -> np.ndarray:
    """[SOS, x_1, .., x_{T-1}]: x (B, T) shifted right by one, SOS in front."""
    x = np.asarray(x)
    return np.concatenate([np.full((len(x), 1), sos, dtype=np.int64), x[:, :-1]], axis=1)


def bert_mask(shape, rate: float, rng: np.random.Generator) -> np.ndarray:
    """Each position masked independently with probability `rate`. A batch that draws no masked
    position at all (possible only for tiny batches) gets one, so the loss is defined."""
    mask = rng.random(shape) < rate
    if not mask.any():
        mask.flat[rng.integers(mask.size)] = True
    return mask


def model_inputs(x: np.ndarray, sos: int, objective: str, mask_rate: float = 0.15, rng=None,
                 mask=None):
    """How an objective shows tokens x (B, T) to the model -> (inputs, causal, input_mask):
    AR reads [SOS, x_1 .. x_{T-1}] under the causal mask; BERT reads x with the positions of `mask`
    (drawn with bert_mask when not given) hidden, without a mask on attention."""
    if objective == "ar":
        return ar_inputs(x, sos), True, None
    if mask is None:
        mask = bert_mask(x.shape, mask_rate, rng)
    return x, False, mask


def generative_loss(model, x: np.ndarray, objective: str = "ar", mask_rate: float = 0.15, rng=None,
                    mask=None, features: bool = False):
    """L_AR (nats per token) or L_BERT (nats per masked token), a scalar Tensor; with
    features=True also the per-layer n^l of the same forward pass (fine-tuning pools n^L)."""
    inputs, causal, input_mask = model_inputs(x, model.config.sos, objective, mask_rate, rng, mask)
    out = model(inputs, causal=causal, input_mask=input_mask, features=features)
    logits, feats = out if features else (out, None)                          # (B, T, V)
    weights = None if input_mask is None else input_mask.astype(np.float64)   # BERT: masked only
    loss = ops.cross_entropy(logits, x, weights=weights)
    return (loss, feats) if features else loss


def ar_loss(model, x: np.ndarray):
    """L_AR in nats per token, a scalar Tensor."""
    return generative_loss(model, x, "ar")


def bert_loss(model, x: np.ndarray, mask: np.ndarray):
    """L_BERT in nats per masked token, a scalar Tensor; mask (B, T) bool from bert_mask."""
    return generative_loss(model, x, "bert", mask=mask)


def unigram_entropy(tokens: np.ndarray, vocab: int) -> float:
    """Entropy in nats of the tokens' frequencies: the loss of a model that ignores all context,
    the bar a trained model must be clearly below."""
    p = np.bincount(np.asarray(tokens).ravel(), minlength=vocab) / np.asarray(tokens).size
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())
