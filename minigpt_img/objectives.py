"""§2.1 Pre-training objectives: autoregressive (AR) and BERT.

Legend: B batch, T = n_px^2 tokens, V palette size; x (B, T) palette tokens in raster order.

AR (§2.1, the paper's main objective): each pixel is predicted from the pixels before it,

    L_AR = E_x [ -log p(x) ] = E_x [ sum_i -log p(x_i | x_1 .. x_{i-1}) ] / T       (nats per token)

The model reads [SOS, x_1, .., x_{T-1}] (input shifted right behind the start-of-sequence token) with
a causal mask, and position i's logits predict x_i.

BERT (§2.1): a set M of positions is masked, each independently with probability 0.15; the model
sees x with the token embeddings at M zeroed (released iGPT code: h * (1 - M)), attends without a
mask, and predicts the masked tokens from everything else,

    L_BERT = E_x E_M [ (1/|M|) sum_{i in M} -log p(x_i | x_[not M]) ]                 (masked only)

averaged over each image's own masked positions first, then over the batch, as the released iGPT
code does (an image with more masked positions does not weigh more).

Losses are in nats per token; bits per token = nats / ln 2.
"""
from __future__ import annotations

import math

import numpy as np

from . import kernels, ops

NATS_TO_BITS = 1.0 / math.log(2.0)


def ar_inputs(x: np.ndarray, sos: int) -> np.ndarray:
    """[SOS, x_1, .., x_{T-1}]: x (B, T) shifted right by one, SOS in front."""
    x = np.asarray(x)
    return np.concatenate([np.full((len(x), 1), sos, dtype=np.int64), x[:, :-1]], axis=1)


def bert_mask(shape, rate: float, rng: np.random.Generator) -> np.ndarray:
    """(B, T) bool: each position masked independently with probability `rate` (§2.1: "each index i
    independently has probability 0.15 of appearing in M"). Departure: an image that draws no masked
    position at all (likely only for tiny images) gets one at random, so its loss, averaged over its
    own masked positions, is defined."""
    mask = rng.random(shape) < rate                                            # (B, T)
    empty = np.flatnonzero(~mask.any(axis=1))
    mask[empty, rng.integers(0, shape[1], len(empty))] = True
    return mask


def draw_mask(objective: str, shape, rate: float, rng: np.random.Generator):
    """The input mask an objective needs for tokens of `shape`: BERT's (bert_mask), None for AR."""
    return bert_mask(shape, rate, rng) if objective == "bert" else None


def bert_weights(mask: np.ndarray) -> np.ndarray:
    """Per-position loss weights (B, T) of L_BERT: 1/|M_b| at image b's masked positions, else 0
    (released iGPT: each image's masked positions averaged, where §2.1's L_BERT sums them)."""
    mask = np.asarray(mask, dtype=np.float64)
    return mask / np.maximum(mask.sum(axis=1, keepdims=True), 1.0)


def model_inputs(x: np.ndarray, sos: int, objective: str, mask_rate: float | None = None, rng=None,
                 mask=None):
    """How an objective shows tokens x (B, T) to the model -> (inputs, causal, input_mask):
    AR reads [SOS, x_1 .. x_{T-1}] under the causal mask; BERT reads x with the positions of `mask`
    (drawn with bert_mask when not given) hidden, without a mask on attention."""
    if objective == "ar":
        return ar_inputs(x, sos), True, None
    if mask is None:
        mask = bert_mask(x.shape, mask_rate, rng)
    return x, False, mask


def generative_loss(model, x: np.ndarray, objective: str = "ar", mask_rate: float | None = None, rng=None,
                    mask=None, features: bool = False):
    """L_AR (nats per token) or L_BERT (nats per masked token), a scalar Tensor; with
    features=True also the per-layer n^l of the same forward pass (fine-tuning pools n^L)."""
    inputs, causal, input_mask = model_inputs(x, model.config.sos, objective, mask_rate, rng, mask)
    if features:
        logits, feats = model.forward_features(inputs, causal, input_mask)    # (B, T, V), L+1 x (B, T, C)
    else:
        logits, feats = model(inputs, causal, input_mask), None               # (B, T, V)
    weights = None if input_mask is None else bert_weights(input_mask)        # BERT: masked only
    loss = ops.cross_entropy(logits, x, weights=weights)
    return (loss, feats) if features else loss


def image_losses(logits: np.ndarray, x: np.ndarray, input_mask=None) -> np.ndarray:
    """Each image's own term of L_AR or L_BERT, (B,) nats per token, from the logits (B, T, V) of
    a no-grad forward pass: -log p(x_i | ...) averaged over the image's T positions (BERT: over its
    masked positions). Their mean over the batch is generative_loss."""
    B, T, V = logits.shape
    nll = kernels.xent_forward(np.ascontiguousarray(logits.reshape(B * T, V)),
                               np.ascontiguousarray(x, dtype=np.int64).reshape(-1))[0].reshape(B, T)
    weights = np.full((B, T), 1.0 / T) if input_mask is None else bert_weights(input_mask)  # (B, T)
    return (nll * weights).sum(axis=1)


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
