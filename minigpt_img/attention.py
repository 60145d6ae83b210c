"""§2.2 attention as numba kernels, flash-attention style, each beside its NumPy *_ref twin.

    S = Q K^T / sqrt(D),  masked where key j > query i + q_offset (causal),  P = softmax(S),  O = P V

Q, K, V are (BH, T, D): batch and heads flattened, each head's rows contiguous. The forward walks
key tiles with an online softmax (running max m and denominator l per query row), so only a
(TILE, TILE) block of S exists at any time, and saves lse = m + log(l) per row for backward.
q_offset places the queries after q_offset earlier positions (incremental decoding with a KV cache).
The *_ref twins materialise the whole (Tq, Tk) matrix per head: the specification the tests check.

Legend: BH = B * NH rows of heads, T tokens, D = C / NH head size.
"""
import numpy as np
from numba import njit, prange

from .kernels import _JIT, exp_inplace

def split_heads(qkv: np.ndarray, n_head: int):
    """(B, T, 3C) fused projections -> q, k, v, each C-contiguous (B*NH, T, D), D = C / NH."""
    B, T, C3 = qkv.shape
    D = C3 // 3 // n_head
    x = qkv.reshape(B, T, 3, n_head, D).transpose(2, 0, 3, 1, 4)  # (3, B, NH, T, D)
    return tuple(np.ascontiguousarray(x[i]).reshape(B * n_head, T, D) for i in range(3))


def merge_heads(o: np.ndarray, B: int) -> np.ndarray:
    """(B*NH, T, D) -> (B, T, NH*D), the heads side by side again."""
    BH, T, D = o.shape
    return np.ascontiguousarray(o.reshape(B, BH // B, T, D).transpose(0, 2, 1, 3)).reshape(B, T, -1)


TILE = 64


@njit(**_JIT)
def _visible(a, i0, j0, bk, causal, q_offset):
    """How many of the bk keys j0, j0+1, ... query row i0 + a may see (keys j <= i + q_offset)."""
    if not causal:
        return bk
    return max(0, min(bk, i0 + a + q_offset - j0 + 1))


@njit(parallel=True, **_JIT)
def attention_forward(q, k, v, causal, q_offset):
    """q (BH, Tq, D), k, v (BH, Tk, D) -> o (BH, Tq, D), lse (BH, Tq) = log sum_j exp(S_ij)."""
    BH, Tq, D = q.shape
    Tk = k.shape[1]
    scale = 1.0 / np.sqrt(D)
    o = np.empty_like(q)
    lse = np.empty((BH, Tq), dtype=q.dtype)
    n_qt = (Tq + TILE - 1) // TILE
    for w in prange(BH * n_qt):  # head-major: each thread gets whole heads, so causal work balances
        bh, i0 = w // n_qt, (w % n_qt) * TILE
        i1 = min(i0 + TILE, Tq)
        Qi = q[bh, i0:i1]                                          # (bq, D)
        m = np.full(i1 - i0, -np.inf)                              # running row max of S
        l = np.zeros(i1 - i0)                                      # running sum of exp(S - m)
        acc = np.zeros((i1 - i0, D), dtype=q.dtype)                # running sum of exp(S - m) V
        buf, work = np.empty(TILE * TILE), np.empty(TILE * TILE)
        m_new = np.empty(i1 - i0)
        k_end = min(Tk, i1 + q_offset) if causal else Tk           # keys any row of the tile sees
        for j0 in range(0, k_end, TILE):
            j1 = min(j0 + TILE, k_end)
            bk = j1 - j0
            S = np.dot(Qi, k[bh, j0:j1].T)                         # (bq, bk)
            for a in range(i1 - i0):                               # S * scale - new running max
                nb = _visible(a, i0, j0, bk, causal, q_offset)
                row_max = -np.inf
                for b in range(nb):
                    row_max = max(row_max, np.float64(S[a, b]))
                m_new[a] = max(m[a], row_max * scale)
                for b in range(nb):
                    buf[a * bk + b] = S[a, b] * scale - m_new[a]
                for b in range(nb, bk):
                    buf[a * bk + b] = -np.inf                      # masked: exp gives ~0, zeroed below
            exp_inplace(buf[:(i1 - i0) * bk], work)                # P = exp(S - m_new), one call per tile
            for a in range(i1 - i0):
                nb = _visible(a, i0, j0, bk, causal, q_offset)
                row_sum = 0.0
                for b in range(nb):
                    S[a, b] = buf[a * bk + b]
                    row_sum += buf[a * bk + b]
                S[a, nb:] = 0.0
                if nb == 0:
                    continue
                corr = np.exp(m[a] - m_new[a])                     # rescales what was summed so far
                l[a] = l[a] * corr + row_sum
                m[a] = m_new[a]
                for d in range(D):
                    acc[a, d] *= corr
            acc += np.dot(S, v[bh, j0:j1])                         # (bq, bk) @ (bk, D)
        for a in range(i1 - i0):
            inv = 1.0 / l[a]
            for d in range(D):
                o[bh, i0 + a, d] = acc[a, d] * inv
            lse[bh, i0 + a] = m[a] + np.log(l[a])
    return o, lse


def _attention_probs_ref(q, k, causal, q_offset):
    D = q.shape[-1]
    S = (q @ np.swapaxes(k, -1, -2)) / np.sqrt(D).astype(q.dtype)    # (BH, Tq, Tk)
    if causal:
        Tq, Tk = S.shape[-2:]
        S = np.where(np.arange(Tk)[None, :] > np.arange(Tq)[:, None] + q_offset, -np.inf, S)
    m = S.max(axis=-1, keepdims=True)
    lse = m + np.log(np.exp(S - m).sum(axis=-1, keepdims=True))
    return np.exp(S - lse), lse[..., 0]


def attention_forward_ref(q, k, v, causal, q_offset):
    """The materialised version: the whole (Tq, Tk) matrix per head."""
    P, lse = _attention_probs_ref(q, k, causal, q_offset)
    return (P @ v).astype(q.dtype), lse.astype(q.dtype)


@njit(parallel=True, **_JIT)
def attention_backward(q, k, v, o, lse, do, causal, q_offset):
    """Backward of attention_forward. In the forward pass O = P V with P = softmax(S), so:

        dV = P^T dO,   dP = dO V^T,   dS = P * (dP - rowsum(dO * O)),   dQ = dS K / sqrt(D),
        dK = dS^T Q / sqrt(D)
    (rowsum(dO * O) = rowsum(dP * P), the softmax Jacobian's diagonal term). P is rebuilt tile by
    tile from the saved lse; for each key tile, dK and dV are summed over the query tiles that see it.
    """
    BH, Tq, D = q.shape
    Tk = k.shape[1]
    scale = 1.0 / np.sqrt(D)
    dq = np.zeros_like(q)
    dk = np.empty_like(k)
    dv = np.empty_like(v)
    for bh in prange(BH):
        delta = np.empty(Tq, dtype=q.dtype)                        # rowsum(dO * O)
        for i in range(Tq):
            s = 0.0
            for d in range(D):
                s += np.float64(do[bh, i, d]) * o[bh, i, d]
            delta[i] = s
        buf, work = np.empty(TILE * TILE), np.empty(TILE * TILE)
        for j0 in range(0, Tk, TILE):
            j1 = min(j0 + TILE, Tk)
            Kj, Vj = k[bh, j0:j1], v[bh, j0:j1]                    # (bk, D)
            dKj = np.zeros((j1 - j0, D), dtype=q.dtype)
            dVj = np.zeros((j1 - j0, D), dtype=q.dtype)
            i_first = max(0, j0 - q_offset) if causal else 0       # earlier queries never see tile j
            for i0 in range(i_first, Tq, TILE):
                i1 = min(i0 + TILE, Tq)
                Qi, dOi = q[bh, i0:i1], do[bh, i0:i1]              # (bq, D)
                P = np.dot(Qi, Kj.T)                               # (bq, bk): S, then P in place
                bk = j1 - j0
                for a in range(i1 - i0):
                    nb = _visible(a, i0, j0, bk, causal, q_offset)
                    for b in range(nb):
                        buf[a * bk + b] = P[a, b] * scale - lse[bh, i0 + a]
                    for b in range(nb, bk):
                        buf[a * bk + b] = -np.inf
                exp_inplace(buf[:(i1 - i0) * bk], work)            # one call per tile
                for a in range(i1 - i0):
                    nb = _visible(a, i0, j0, bk, causal, q_offset)
                    for b in range(nb):
                        P[a, b] = buf[a * bk + b]
                    P[a, nb:] = 0.0
                dVj += np.dot(P.T, dOi)                            # (bk, D)
                dS = np.dot(dOi, Vj.T)                             # (bq, bk): dP, then dS in place
                for a in range(i1 - i0):
                    for b in range(j1 - j0):
                        dS[a, b] = P[a, b] * (dS[a, b] - delta[i0 + a]) * scale
                dq[bh, i0:i1] += np.dot(dS, Kj)
                dKj += np.dot(dS.T, Qi)
            dk[bh, j0:j1] = dKj
            dv[bh, j0:j1] = dVj
    return dq, dk, dv


def attention_backward_ref(q, k, v, o, lse, do, causal, q_offset):
    P, _ = _attention_probs_ref(q, k, causal, q_offset)
    scale = 1.0 / np.sqrt(q.shape[-1])
    dv = np.swapaxes(P, -1, -2) @ do
    dP = do @ np.swapaxes(v, -1, -2)
    dS = P * (dP - np.sum(do * o, axis=-1, keepdims=True)) * scale
    dq, dk = dS @ k, np.swapaxes(dS, -1, -2) @ q
    return dq.astype(q.dtype), dk.astype(q.dtype), dv.astype(q.dtype)
