"""§2.2 Architecture: the GPT-2 transformer decoder exactly as released for Image GPT.

Legend: B batch, T = n_px^2 tokens, C = n_embd width, V palette size, NH heads, D = C / NH, L layers.

For a sequence of palette tokens x_1..x_T (raster order; the AR objective puts the start-of-sequence
token SOS = V in front and drops the last pixel, see objectives.py):

    h^0   = W_te[x] + W_pe[positions]                   token + learned position embeddings
    n^l   = norm(h^l)                                   the features linear probes pool (§2.4)
    a^l   = h^l + attn(n^l)                             a^l = h^l + c_proj(softmax(QK^T/sqrt(D) + M) V)
    h^l+1 = a^l + mlp(norm(a^l))                        mlp(x) = c_proj(gelu2(c_fc(x))), width 4C
    n^L   = norm(h^L)                                   the final norm
    logits = n^L W_head                                 over the V palette colours only (no SOS logit)

norm(x) = x / sqrt(mean(x^2) + 1e-5) * g (iGPT's norm: no centring, no bias), gelu2(x) = x sigmoid(1.702x).
M is the causal mask (AR: §2.2 "we apply the standard upper triangular mask to the n x n matrix of
attention logits") or nothing (BERT). Parameter names follow Hugging Face's ImageGPT state dict;
places where the released iGPT code differs from GPT-2 or the paper's text are marked "released iGPT"
(the norm, the activation, the initialisation, SOS).

§3.3: "We use the same model code as GPT-2, except that we initialize weights in the layer-dependent
fashion as in Sparse Transformer (Child et al., 2019) and zero-initialize all projections producing
logits." The layer-dependent scales here are the released code's (Attention, MLP, Transformer
below); the zero-initialised projections producing logits are the head (lm_head) and fine-tuning's
classifier (tasks.FineTuning). §3.4: "No dropout is used": there is none.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np

from . import attention, decode_kernels, nn, ops
from .tensor import Tensor, no_grad
from .threads import current_threads, kernels_on_this_thread, numba_threads


@dataclass(frozen=True)
class GPTConfig:
    n_layer: int = 4
    n_embd: int = 128
    n_head: int = 4
    n_px: int = 16           # image side in pixels; the context is n_px^2 tokens
    vocab: int = 512         # palette size V; token id V is the start-of-sequence token
    bias: bool = False       # released iGPT has no biases; True for checkpoints that carry them

    def __post_init__(self):
        for name in ("n_layer", "n_embd", "n_head", "n_px", "vocab"):
            if getattr(self, name) < 1:
                raise ValueError(f"GPTConfig.{name} must be positive, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}")

    @property
    def n_ctx(self) -> int:
        return self.n_px * self.n_px

    @property
    def sos(self) -> int:
        return self.vocab


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig, rng, dtype):
        C = cfg.n_embd
        # released iGPT (§3.3's "layer-dependent fashion as in Sparse Transformer"): q, k, v
        # projections ~ N(0, 1/C) and the output projection ~ N(0, 1/(C L)) (depth-scaled), where GPT-2
        # uses 0.02 and 0.02/sqrt(2L). Hugging Face fuses q, k, v.
        self.c_attn = nn.Linear(C, 3 * C, rng, std=C ** -0.5, bias=cfg.bias, dtype=dtype)
        self.c_proj = nn.Linear(C, C, rng, std=(C * cfg.n_layer) ** -0.5, bias=cfg.bias, dtype=dtype)
        self.n_head = cfg.n_head

    def forward(self, x, causal=True, cache=None, layer=0):
        qkv = self.c_attn(x)                                         # (B, T, 3C)
        if cache is None:
            a = ops.attention(qkv, self.n_head, causal)              # (B, T, C)
        else:  # decoding (ImageGPT.decode, under no_grad): attend to the cached keys and values too
            a = Tensor(cache.attend(layer, qkv.data, self.n_head))   # (B, T, C)
        return self.c_proj(a)                                        # (B, T, C)

    def step(self, n, cache, layer):
        """forward for a decoding step of a few rows (ImageGPT.decode), on arrays: n (B, T, C) ->
        (B, T, C), the whole sub-layer in two parallel loops (attention.decode_layer) on cache.threads."""
        with numba_threads(cache.threads):
            return attention.decode_layer(n, *_arrays(self.c_attn), *_arrays(self.c_proj),
                                          cache.k[layer], cache.v[layer], cache.length)


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig, rng, dtype):
        C = cfg.n_embd
        # released iGPT: both MLP projections ~ N(0, 0.02), no depth scaling.
        self.c_fc = nn.Linear(C, 4 * C, rng, bias=cfg.bias, dtype=dtype)
        self.c_proj = nn.Linear(4 * C, C, rng, bias=cfg.bias, dtype=dtype)

    def forward(self, x):
        return self.c_proj(ops.gelu2(self.c_fc(x)))                  # (B, T, 4C) -> (B, T, C)

    def step(self, n, threads: int):
        """forward for a decoding step of a few rows, on arrays: two parallel loops on that many
        threads (decode_kernels.few_rows_mlp)."""
        B, T, C = n.shape
        with numba_threads(threads):
            y = decode_kernels.few_rows_mlp(n.reshape(B * T, C), *_arrays(self.c_fc), *_arrays(self.c_proj))
        return y.reshape(B, T, C)


def _arrays(linear: nn.Linear):
    """A Linear's weight and bias (None when it has none) as arrays, for the decoding kernels."""
    return linear.weight.data, (linear.bias.data if hasattr(linear, "bias") else None)


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, rng, dtype):
        self.ln_1 = nn.Norm(cfg.n_embd, dtype=dtype)
        self.attn = Attention(cfg, rng, dtype)
        self.ln_2 = nn.Norm(cfg.n_embd, dtype=dtype)
        self.mlp = MLP(cfg, rng, dtype)

    def forward(self, h, causal=True, cache=None, layer=0):
        n = self.ln_1(h)                                             # n^l (B, T, C)
        a = h + self.attn(n, causal, cache, layer)                   # (B, T, C)
        return a + self.mlp(self.ln_2(a)), n


class Transformer(nn.Module):
    def __init__(self, cfg: GPTConfig, rng, dtype):
        # released iGPT: token embeddings ~ N(0, 0.02), position embeddings ~ N(0, 0.01). Released iGPT
        # keeps SOS as a separate vector; Hugging Face stores it as the last row of wte, as here.
        self.wte = nn.Embedding(cfg.vocab + 1, cfg.n_embd, rng, std=0.02, dtype=dtype)
        self.wpe = nn.Embedding(cfg.n_ctx, cfg.n_embd, rng, std=0.01, dtype=dtype)
        self.h = [Block(cfg, rng, dtype) for _ in range(cfg.n_layer)]
        self.ln_f = nn.Norm(cfg.n_embd, dtype=dtype)


class ImageGPT(nn.Module):
    """The whole model. Three ways in, one path through the blocks (`_forward`), and a decoding
    step's own for a few rows (`_step`):
        forward(tokens)             -> logits (B, T, V)                  training and evaluation
        forward_features(tokens)    -> logits and [n^0 .. n^L]           probes, fine-tuning (§2.3, §2.4)
        decode(tokens, cache)       -> logits, no gradients              sampling with the KV cache
    """

    def __init__(self, cfg: GPTConfig, rng: np.random.Generator | None, dtype=np.float32):
        """rng: the stream of the initial weights; None leaves them at zero for a loader to fill."""
        self.config = cfg
        self.transformer = Transformer(cfg, rng, dtype)
        # released iGPT, §3.3 "zero-initialize all projections producing logits": the untied output
        # head starts at zero (every colour equally likely).
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab, rng, std=0.0, dtype=dtype)

    def forward(self, tokens, causal=True, input_mask=None):
        """tokens (B, T) ints in [0, V] (V = SOS) -> logits (B, T, V). causal=False is the BERT model
        (no attention mask); input_mask (B, T) bool zeroes the token embedding where True (BERT's
        masked positions; the position embedding stays)."""
        return self._forward(tokens, causal, input_mask)[0]

    def forward_features(self, tokens, causal=True, input_mask=None, upto=None, pool=None):
        """As forward, and also the features [n^0, ..., n^L], each (B, T, C), of the same pass.
        upto = k < L: only the blocks below k run, and only [n^0, ..., n^k] come back, with no
        logits (None): a probe of the middle layers need not pay for the top half. pool: a function
        applied to each n^l as soon as it is made, whose results come back instead (a probe's
        average over positions: the L + 1 full features never exist at once)."""
        return self._forward(tokens, causal, input_mask, upto=upto, pool=pool or (lambda n: n))

    def decode(self, tokens, cache: "KVCache"):
        """Inference only (no gradients): logits (B, T, V) of tokens (B, T) that continue the
        positions already in the cache, whose keys and values are read instead of recomputed. A
        decoding step (T <= attention.DECODE_ROWS) runs its tiny kernels on the calling thread and
        the loops that read every weight or the whole cache on cache.threads of numba's
        (threads.kernels_on_this_thread); with at most decode_kernels.FEW_ROWS rows in all it goes
        through _step."""
        tokens = np.asarray(tokens)
        B, T = tokens.shape
        few = T <= attention.DECODE_ROWS                                   # a decoding step, not a prompt
        with no_grad(), (kernels_on_this_thread() if few else nullcontext()):
            if few and B * T <= decode_kernels.FEW_ROWS:
                logits = self._step(tokens, cache)
            else:
                logits = self._forward(tokens, True, None, cache)[0]
        cache.length += T
        return logits

    def _step(self, tokens, cache: "KVCache"):
        """The blocks of decode for a few rows, on arrays: each sub-layer two parallel loops that
        read its weights (and the layer's cache) once, the norms and residual adds between them
        tiny; the same sums as _forward up to rounding (tested)."""
        tr = self.transformer
        h = self._embed(tokens, cache.length).data                          # (B, T, C)
        for layer, block in enumerate(tr.h):
            h = h + block.attn.step(block.ln_1(h).data, cache, layer)       # a^l
            h = h + block.mlp.step(block.ln_2(h).data, cache.threads)       # h^l+1
        n = tr.ln_f(h)                                                      # n^L (B, T, C)
        with numba_threads(cache.threads):                                  # streams the head's weight
            return self.lm_head(n)                                          # (B, T, V)

    def _embed(self, tokens, t0: int, input_mask=None):
        """h^0 (B, T, C) of tokens (B, T) at positions t0 .., after checking both."""
        cfg = self.config
        B, T = tokens.shape
        if t0 + T > cfg.n_ctx:
            raise ValueError(f"{t0 + T} positions exceed the context of {cfg.n_ctx} (n_px={cfg.n_px})")
        if tokens.min(initial=0) < 0 or tokens.max(initial=0) > cfg.vocab:
            raise ValueError(f"tokens must lie in [0, {cfg.vocab}] (palette colours and SOS={cfg.sos})")
        tr = self.transformer
        h = tr.wte(tokens)                                           # (B, T, C)
        if input_mask is not None:
            keep = (~np.asarray(input_mask, dtype=bool))[..., None].astype(h.dtype)
            h = h * keep                                             # released iGPT BERT: h * (1 - M)
        return h + tr.wpe.weight[t0:t0 + T]                          # (B, T, C) + (T, C)

    def _forward(self, tokens, causal, input_mask, cache=None, upto=None, pool=None):
        tokens = np.asarray(tokens)
        tr = self.transformer
        h = self._embed(tokens, cache.length if cache is not None else 0, input_mask)  # h^0 (B, T, C)
        # what of each n^l is kept: nothing unless asked (forward, decode), so that each is freed once
        # the next block has read it (under no_grad at iGPT-S size, 8 images: 25 x 16.8 MB)
        take = pool or (lambda n: None)
        feats = []
        for layer, block in enumerate(tr.h):
            if upto is not None and layer == upto:                   # stop at n^upto: no logits
                return None, feats + [take(block.ln_1(h))]
            h, n = block(h, causal, cache, layer)
            feats.append(take(n))
        n = tr.ln_f(h)                                               # n^L (B, T, C)
        feats.append(take(n))
        return self.lm_head(n), feats                                # (B, T, V), L+1 x (B, T, C)


class KVCache:
    """Keys and values of every layer for the positions decoded so far, so that each new token costs
    one pass over the new position plus an attention read of the cache (O(T) per token, not O(T^2)).
    Arrays are head-major, (L, B, NH, n_ctx, D), preallocated for the whole image: each head's keys
    are one contiguous block that decoding reads in place (attention.decode_layer, attention_decode).
    threads: how many of numba's threads the loops of a decoding step that read every weight or the
    whole cache run on (the rest run on the calling thread: ImageGPT.decode); by default the count in
    effect when the cache is made (threads.set_threads, a FairShare, --threads)."""

    def __init__(self, cfg: GPTConfig, batch: int, dtype=np.float32, threads: int | None = None):
        self.threads = threads or current_threads()
        D = cfg.n_embd // cfg.n_head
        self.k = np.zeros((cfg.n_layer, batch, cfg.n_head, cfg.n_ctx, D), dtype=dtype)
        self.v = np.zeros_like(self.k)
        self.length = 0

    def attend(self, layer: int, qkv: np.ndarray, n_head: int) -> np.ndarray:
        """Store this step's keys/values, attend its queries to every position so far -> (B, T, C)."""
        q, k, v = attention.heads(qkv, n_head)                             # 3 x (B, T, NH, D) views
        B, T = qkv.shape[:2]
        t0, t1 = self.length, self.length + T
        self.k[layer, :, :, t0:t1] = k.transpose(0, 2, 1, 3)                # (B, NH, T, D)
        self.v[layer, :, :, t0:t1] = v.transpose(0, 2, 1, 3)
        # Causal with q_offset = t0: the kernels read keys < t1 only, never the unwritten rest.
        if T <= attention.DECODE_ROWS:                                     # a token or a few
            with numba_threads(self.threads):                              # reads the whole cache
                o = attention.attention_decode(q, self.k[layer], self.v[layer], t0)
        else:                                                              # a prompt: the tiled kernel
            o, _ = attention.attention_forward(q, self.k[layer].transpose(0, 2, 1, 3),
                                               self.v[layer].transpose(0, 2, 1, 3), True, t0,
                                               *attention.forward_tiles(q.shape[-1], t1))
        return o.reshape(B, T, -1)                                         # (B, T, C)
