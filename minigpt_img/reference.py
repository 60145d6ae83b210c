"""§2.1-§2.2 The whole Image GPT forward pass on one page, in plain NumPy: read it beside the paper.

Legend: B batch, T = n_px^2 tokens, C width, V palette, NH heads, D = C / NH, L layers.

No autograd, no kernels, nothing imported but the one stable softmax: this page computes what
`ImageGPT.forward_features` computes with its numba kernels (tested equal, and equal to Hugging
Face's logits). `p` is a state dict with Hugging Face's names (`model.state_dict()`, or
`checkpoint.load_arrays` of a train.py checkpoint with its "model/" prefix taken off).

    inputs = [SOS, x_1 .. x_{T-1}]                          AR (§2.1): each pixel sees only those before it
           | x, with the token embeddings of M zeroed        BERT (§2.1): "we zero out the positions in M"
    h^0    = W_te[inputs] + W_pe                             token + learned position embeddings
    n^l    = norm(h^l)                                       the features a linear probe pools (§2.4)
    a^l    = h^l + attn(n^l) W_proj                          multi-head attention, causal for AR
    h^l+1  = a^l + gelu2(norm(a^l) W_fc) W_mlp_proj          MLP of width 4C
    logits = norm(h^L) W_head                                over the V palette colours (no SOS logit)

§2.2: "We use the GPT-2 formulation of the transformer decoder block"; where the released iGPT code
differs from GPT-2, this follows the released code (the norm, the activation), as Hugging Face does.
"""
from __future__ import annotations

import numpy as np

from .kernels import logsumexp


def norm(x, g, eps=1e-5):
    """The paper's "layer_norm", as released iGPT computes it: x / sqrt(mean(x^2) + eps) * g over the
    last axis, with no mean-centring and no bias (departure from GPT-2's layer norm, released iGPT)."""
    return x / np.sqrt((x * x).mean(axis=-1, keepdims=True) + eps) * g


def gelu2(x):
    """x * sigmoid(1.702 x): released iGPT's activation (departure from GPT-2's tanh gelu)."""
    return x / (1.0 + np.exp(-1.702 * x))


def linear(x, p, name):
    """x @ W (+ b): W is (in, out), the GPT-2 / Hugging Face Conv1D layout."""
    y = x @ p[name + ".weight"]
    return y + p[name + ".bias"] if name + ".bias" in p else y


def attn(x, p, name, n_head, causal):
    """softmax(Q K^T / sqrt(D) + mask) V per head, on the fused projection [Q K V] = x W_attn; the
    mask is §2.2's "standard upper triangular mask" for AR, none for BERT."""
    B, T, C = x.shape
    D = C // n_head
    qkv = linear(x, p, name + ".c_attn")                                      # (B, T, 3C)
    q, k, v = (qkv[..., i * C:(i + 1) * C].reshape(B, T, n_head, D).transpose(0, 2, 1, 3)
               for i in range(3))                                             # 3 x (B, NH, T, D)
    S = q @ k.transpose(0, 1, 3, 2) / np.sqrt(D)                              # (B, NH, T, T)
    if causal:
        S = np.where(np.triu(np.ones((T, T), dtype=bool), k=1), -np.inf, S)   # no look at later pixels
    o = np.exp(S - logsumexp(S)) @ v                                          # softmax over keys, (B, NH, T, D)
    return linear(o.transpose(0, 2, 1, 3).reshape(B, T, C), p, name + ".c_proj")  # (B, T, C)


def mlp(x, p, name):
    return linear(gelu2(linear(x, p, name + ".c_fc")), p, name + ".c_proj")  # (B, T, 4C), then (B, T, C)


def forward(p: dict, x: np.ndarray, n_head: int, objective: str = "ar", mask=None):
    """An image's palette tokens x (B, T) in [0, V) -> logits (B, T, V), position i's predicting x_i,
    and the features [n^0, .., n^L], each (B, T, C). objective "ar" reads x shifted behind SOS under
    the causal mask; "bert" reads x with the positions of mask (B, T) bool hidden, without a mask."""
    wte, wpe = p["transformer.wte.weight"], p["transformer.wpe.weight"]       # (V + 1, C), (T, C)
    B, T = x.shape
    sos = len(wte) - 1                                                        # SOS is the last row
    if objective == "ar":
        inputs = np.concatenate([np.full((B, 1), sos), x[:, :-1]], axis=1)    # [SOS, x_1 .. x_{T-1}]
        h = wte[inputs]                                                       # (B, T, C)
    else:
        h = wte[x] * ~mask[..., None]                                         # zero the embeddings at M
    h = h + wpe[:T]                                                           # (B, T, C)
    feats = []
    n_layer = sum(1 for k in p if k.endswith(".ln_1.weight"))
    for l in range(n_layer):
        b = f"transformer.h.{l}"
        n = norm(h, p[b + ".ln_1.weight"])                                    # n^l (B, T, C)
        feats.append(n)
        a = h + attn(n, p, b + ".attn", n_head, objective == "ar")            # (B, T, C)
        h = a + mlp(norm(a, p[b + ".ln_2.weight"]), p, b + ".mlp")             # (B, T, C)
    n = norm(h, p["transformer.ln_f.weight"])                                 # n^L (B, T, C)
    feats.append(n)
    return n @ p["lm_head.weight"], feats                                     # (B, T, V)
