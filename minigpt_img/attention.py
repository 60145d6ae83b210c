"""§2.2 attention as numba kernels, flash-attention style, each beside its NumPy *_ref twin.

    S = Q K^T / sqrt(D),  masked where key j > query i + q_offset (causal),  P = softmax(S),  O = P V

Q, K, V are (BH, T, D): batch and heads flattened, each head's rows contiguous. The forward walks
key tiles with an online softmax (running max m and denominator l per query row), so only a
(TQ, TK) block of S exists at any time, and saves lse = m + log(l) per row for backward.
q_offset places the queries after q_offset earlier positions (incremental decoding with a KV cache).
The *_ref twins materialise the whole (Tq, Tk) matrix per head: the specification the tests check.

Legend: BH = B * NH rows of heads, T tokens, D = C / NH head size.
"""
import numpy as np
from numba import njit, prange

from .kernels import _JIT, exp_inplace, row_max

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


# Tiles: TQ query rows by TK keys. Every tile product is a BLAS GEMM of TQ * TK * D multiply-adds,
# called from inside our own parallel loop. Measured here: GEMMs of m * n * k <= 2^18 ran on the
# calling thread; at 2^19 OpenBLAS started its own threads inside ours and a layer's forward took
# 60x longer. So the key tile shrinks as the head grows: TK = 128 for D <= 32, 64 for D = 64, 32 for
# D = 128. (64 x 128 beat 64 x 64 by 1.25x on the forward.)
TQ = 64
GEMM_ONE_THREAD = 1 << 18


@njit(**_JIT)
def _key_tile(D):
    return max(8, min(128, GEMM_ONE_THREAD // (TQ * D)))


@njit(**_JIT)
def _visible(a, i0, j0, bk, causal, q_offset):
    """How many of the bk keys j0, j0+1, ... query row i0 + a may see (keys j <= i + q_offset)."""
    if not causal:
        return bk
    return max(0, min(bk, i0 + a + q_offset - j0 + 1))


@njit(parallel=True, **_JIT)
def attention_forward(q, k, v, causal, q_offset):
    """q (BH, Tq, D), k, v (BH, Tk, D) -> o (BH, Tq, D), lse (BH, Tq) = log sum_j exp(S_ij).
    Tiles are computed in the inputs' precision (float32 SIMD for float32); row statistics m, l
    in float64."""
    BH, Tq, D = q.shape
    Tk = k.shape[1]
    TK = _key_tile(D)
    scale = q.dtype.type(1.0 / np.sqrt(D))
    o = np.empty_like(q)
    lse = np.empty((BH, Tq), dtype=q.dtype)
    n_qt = (Tq + TQ - 1) // TQ
    for w in prange(BH * n_qt):  # head-major: each thread gets whole heads, so causal work balances
        bh, i0 = w // n_qt, (w % n_qt) * TQ
        i1 = min(i0 + TQ, Tq)
        bq = i1 - i0
        Qi = q[bh, i0:i1]                                          # (bq, D)
        m = np.full(bq, -np.inf)                                   # running row max of S
        l = np.zeros(bq)                                           # running sum of exp(S - m)
        acc = np.zeros((bq, D), dtype=q.dtype)                     # running sum of exp(S - m) V
        PV = np.empty((bq, D), dtype=q.dtype)
        S_buf, work = np.empty(TQ * TK, dtype=q.dtype), np.empty(TQ * TK, dtype=q.dtype)
        k_end = min(Tk, i1 + q_offset) if causal else Tk           # keys any row of the tile sees
        for j0 in range(0, k_end, TK):
            j1 = min(j0 + TK, k_end)
            bk = j1 - j0
            S = S_buf[:bq * bk].reshape(bq, bk)
            np.dot(Qi, k[bh, j0:j1].T, S)                          # (bq, bk) = Q_i K_j^T
            for a in range(bq):                                    # S * scale - new running max
                nb = _visible(a, i0, j0, bk, causal, q_offset)
                row = S[a]
                if nb == 0:
                    row[:] = -np.inf
                    continue
                m_new = max(m[a], np.float64(row_max(row, nb)) * scale)
                corr = np.exp(m[a] - m_new)                        # rescales what was summed so far
                m[a], l[a] = m_new, l[a] * corr
                acc[a] *= q.dtype.type(corr)
                shift = q.dtype.type(m_new)
                for b in range(nb):
                    row[b] = row[b] * scale - shift
                row[nb:] = -np.inf
            exp_inplace(S_buf[:bq * bk], work)                     # P = exp(S - m_new), one call per tile
            for a in range(bq):
                nb = _visible(a, i0, j0, bk, causal, q_offset)
                row = S[a]
                row_sum = 0.0
                for b in range(nb):
                    row_sum += row[b]
                row[nb:] = 0.0                                     # masked keys: exactly zero
                l[a] += row_sum
            np.dot(S, v[bh, j0:j1], PV)                            # (bq, D) = P V_j
            acc += PV
        for a in range(bq):
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
    TK = _key_tile(D)
    scale = q.dtype.type(1.0 / np.sqrt(D))
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
        P_buf, dS_buf = np.empty(TQ * TK, dtype=q.dtype), np.empty(TQ * TK, dtype=q.dtype)
        work = np.empty(TQ * TK, dtype=q.dtype)
        tmp_k, tmp_q = np.empty((TK, D), dtype=q.dtype), np.empty((TQ, D), dtype=q.dtype)
        for j0 in range(0, Tk, TK):
            j1 = min(j0 + TK, Tk)
            bk = j1 - j0
            Kj, Vj = k[bh, j0:j1], v[bh, j0:j1]                    # (bk, D)
            dKj = np.zeros((bk, D), dtype=q.dtype)
            dVj = np.zeros((bk, D), dtype=q.dtype)
            tk = tmp_k[:bk]
            i_first = max(0, j0 - q_offset) if causal else 0       # earlier queries never see tile j
            for i0 in range(i_first - i_first % TQ, Tq, TQ):
                i1 = min(i0 + TQ, Tq)
                bq = i1 - i0
                Qi, dOi = q[bh, i0:i1], do[bh, i0:i1]              # (bq, D)
                P = P_buf[:bq * bk].reshape(bq, bk)
                np.dot(Qi, Kj.T, P)                                # S, then P in place
                for a in range(bq):
                    nb = _visible(a, i0, j0, bk, causal, q_offset)
                    row, lse_a = P[a], lse[bh, i0 + a]
                    for b in range(nb):
                        row[b] = row[b] * scale - lse_a
                    row[nb:] = -np.inf
                exp_inplace(P_buf[:bq * bk], work)                 # one call per tile
                for a in range(bq):
                    P[a, _visible(a, i0, j0, bk, causal, q_offset):] = 0.0
                np.dot(P.T, dOi, tk)                               # (bk, D)
                dVj += tk
                dS = dS_buf[:bq * bk].reshape(bq, bk)
                np.dot(dOi, Vj.T, dS)                              # dP, then dS in place
                for a in range(bq):
                    delta_a = delta[i0 + a]
                    for b in range(bk):
                        dS[a, b] = P[a, b] * (dS[a, b] - delta_a) * scale
                tq = tmp_q[:bq]
                np.dot(dS, Kj, tq)                                 # (bq, D)
                dq[bh, i0:i1] += tq
                np.dot(dS.T, Qi, tk)                               # (bk, D)
                dKj += tk
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
