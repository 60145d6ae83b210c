"""§2.2 The whole Image GPT forward pass on one page, in plain NumPy: read it beside the paper.

Legend: B batch, T = n_px^2 tokens, C width, V palette, NH heads, D = C / NH, L layers.

No autograd, no kernels: each step is the NumPy twin (`*_ref`) that the tests hold the fast numba
kernels to, so this page computes what `ImageGPT.forward_features` computes (tested equal, and equal
to Hugging Face's logits). `p` is a state dict with Hugging Face's names (`model.state_dict()`, or
`checkpoint.load_arrays` of a train.py checkpoint with its "model/" prefix taken off).

    h^0    = W_te[x] + W_pe                                  token + learned position embeddings
    n^l    = norm(h^l)                                       the features a linear probe pools (§2.4)
    a^l    = h^l + attn(n^l) W_proj                          multi-head attention, causal for AR
    h^l+1  = a^l + gelu2(norm(a^l) W_fc) W_mlp_proj          MLP of width 4C
    logits = norm(h^L) W_head                                over the V palette colours (no SOS logit)
"""
from __future__ import annotations

import numpy as np

from .attention import attention_forward_ref, heads
from .kernels import gelu2_forward_ref, norm_forward_ref


def norm(x, g):
    """iGPT's norm over the last axis: x / sqrt(mean(x^2) + 1e-5) * g (no centring, no bias)."""
    return norm_forward_ref(x.reshape(-1, x.shape[-1]), g, 1e-5)[0].reshape(x.shape)


def linear(x, p, name):
    """x @ W (+ b): W is (in, out), the GPT-2 / Hugging Face Conv1D layout."""
    y = x @ p[name + ".weight"]
    return y + p[name + ".bias"] if name + ".bias" in p else y


def attn(x, p, name, n_head, causal):
    """softmax(Q K^T / sqrt(D) + mask) V per head, on the fused projection qkv = x W_attn."""
    qkv = linear(x, p, name + ".c_attn")                                      # (B, T, 3C)
    q, k, v = heads(qkv, n_head)                                              # 3 x (B, T, NH, D)
    o, _ = attention_forward_ref(q, k, v, causal, 0)                          # (B, T, NH, D)
    return linear(o.reshape(qkv.shape[0], qkv.shape[1], -1), p, name + ".c_proj")  # (B, T, C)


def mlp(x, p, name):
    return linear(gelu2_forward_ref(linear(x, p, name + ".c_fc")), p, name + ".c_proj")  # 4C, then C


def forward(p: dict, tokens: np.ndarray, n_head: int, causal: bool = True):
    """tokens (B, T) in [0, V] -> logits (B, T, V) and features [n^0, .., n^L], each (B, T, C)."""
    T = tokens.shape[1]
    h = p["transformer.wte.weight"][tokens] + p["transformer.wpe.weight"][:T]  # (B, T, C)
    feats = []
    n_layer = sum(1 for k in p if k.endswith(".ln_1.weight"))
    for l in range(n_layer):
        b = f"transformer.h.{l}"
        n = norm(h, p[b + ".ln_1.weight"])                                    # n^l (B, T, C)
        feats.append(n)
        a = h + attn(n, p, b + ".attn", n_head, causal)                       # (B, T, C)
        h = a + mlp(norm(a, p[b + ".ln_2.weight"]), p, b + ".mlp")             # (B, T, C)
    n = norm(h, p["transformer.ln_f.weight"])                                 # n^L (B, T, C)
    feats.append(n)
    return n @ p["lm_head.weight"], feats                                     # (B, T, V)
