"""numba kernels for the hot loops, each beside a plain NumPy `*_ref` twin that states what it computes.

The twins are the specification: tests compare every kernel with its twin on awkward shapes (one row,
odd widths, batch 1) in float32 and float64. The engine (ops.py) calls the kernels; the twins are for
reading and testing. Kernels accumulate reductions in float64 whatever the input dtype, take
C-contiguous arrays (ops.py makes them so) and are deterministic: where rows are split across threads,
the split is a fixed number of chunks, so results do not depend on the thread count.

Dimension legend: N rows (B*T flattened), C width, V palette/vocabulary size.

With NUMBA_DISABLE_JIT=1 every kernel runs as plain Python: slow, but the same results.
"""
import numpy as np
from numba import njit, prange

# No 'nnan'/'ninf' fast-math flags: a NaN loss must stay NaN so training can detect it.
_FASTMATH = {"nsz", "arcp", "contract", "reassoc"}
_JIT = dict(cache=True, nogil=True, fastmath=_FASTMATH)

# Gradients summed over rows (norm weight) are reduced over this many fixed row chunks.
_N_CHUNKS = 64

GELU2_K = 1.702  # the iGPT activation x * sigmoid(1.702 x)


# ---------------------------------------------------------------------------------------------
# iGPT norm:  y = x / sqrt(mean(x^2) + eps) * g        (no mean-centring, no bias)
# ---------------------------------------------------------------------------------------------
@njit(parallel=True, **_JIT)
def norm_forward(x, g, eps):
    """x (N, C), g (C,) -> y (N, C), rstd (N,) where rstd = 1 / sqrt(mean(x^2) + eps)."""
    N, C = x.shape
    y = np.empty_like(x)
    rstd = np.empty(N, dtype=x.dtype)
    for i in prange(N):
        ms = 0.0
        for j in range(C):
            ms += np.float64(x[i, j]) * x[i, j]
        r = 1.0 / np.sqrt(ms / C + eps)
        rstd[i] = r
        for j in range(C):
            y[i, j] = x[i, j] * r * g[j]
    return y, rstd


def norm_forward_ref(x, g, eps):
    rstd = 1.0 / np.sqrt(np.mean(x.astype(np.float64) ** 2, axis=-1) + eps)
    return (x * rstd[:, None] * g).astype(x.dtype), rstd.astype(x.dtype)


@njit(parallel=True, **_JIT)
def norm_backward(dy, x, g, rstd):
    """Backward of norm_forward. With xhat = x * r and dxhat = dy * g:

        dx = r * (dxhat - xhat * mean(dxhat * xhat))      dg = sum over rows of dy * xhat
    """
    N, C = x.shape
    dx = np.empty_like(x)
    n_chunks = min(N, _N_CHUNKS)
    dg_part = np.zeros((n_chunks, C), dtype=np.float64)
    for c in prange(n_chunks):
        for i in range(c * N // n_chunks, (c + 1) * N // n_chunks):
            r = np.float64(rstd[i])
            dot = 0.0
            for j in range(C):
                dot += np.float64(dy[i, j]) * g[j] * x[i, j]
            m = dot * r / C  # mean(dxhat * xhat)
            for j in range(C):
                xh = x[i, j] * r
                dx[i, j] = r * (dy[i, j] * g[j] - xh * m)
                dg_part[c, j] += dy[i, j] * xh
    dg = np.zeros(C, dtype=np.float64)
    for c in range(n_chunks):  # fixed order: the same sum whatever the thread count
        for j in range(C):
            dg[j] += dg_part[c, j]
    return dx, dg.astype(x.dtype)


def norm_backward_ref(dy, x, g, rstd):
    r = rstd.astype(np.float64)[:, None]
    xhat = x * r
    dxhat = dy * g
    dx = r * (dxhat - xhat * np.mean(dxhat * xhat, axis=-1, keepdims=True))
    dg = np.sum(dy * xhat, axis=0)
    return dx.astype(x.dtype), dg.astype(x.dtype)


# ---------------------------------------------------------------------------------------------
# iGPT activation ("gelu2" in the released code, "quick_gelu" in Hugging Face): y = x * sigmoid(1.702 x)
# ---------------------------------------------------------------------------------------------
@njit(parallel=True, **_JIT)
def gelu2_forward(x):
    """x (n,) flat -> y (n,)."""
    y = np.empty_like(x)
    for i in prange(x.size):
        s = 1.0 / (1.0 + np.exp(-GELU2_K * x[i]))
        y[i] = x[i] * s
    return y


def _sigmoid_ref(z):
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # = 1 / (1 + exp(-z)), without overflow warnings


def gelu2_forward_ref(x):
    return (x * _sigmoid_ref(GELU2_K * x)).astype(x.dtype)


@njit(parallel=True, **_JIT)
def gelu2_backward(dy, x):
    """dy/dx of x * s(kx) is s + k x s (1 - s), with s = sigmoid(k x)."""
    dx = np.empty_like(x)
    for i in prange(x.size):
        s = 1.0 / (1.0 + np.exp(-GELU2_K * x[i]))
        dx[i] = dy[i] * (s + GELU2_K * x[i] * s * (1.0 - s))
    return dx


def gelu2_backward_ref(dy, x):
    s = _sigmoid_ref(GELU2_K * x)
    return (dy * (s + GELU2_K * x * s * (1.0 - s))).astype(x.dtype)


# ---------------------------------------------------------------------------------------------
# softmax cross-entropy over the last axis, integer targets
#   loss_i = logsumexp(z_i) - z_i[t_i]
# ---------------------------------------------------------------------------------------------
@njit(parallel=True, **_JIT)
def xent_forward(z, t):
    """z (N, V) logits, t (N,) int targets -> loss (N,) per row, lse (N,) log-sum-exp per row."""
    N, V = z.shape
    loss = np.empty(N, dtype=np.float64)
    lse = np.empty(N, dtype=np.float64)
    for i in prange(N):
        m = -np.inf
        for j in range(V):
            m = max(m, np.float64(z[i, j]))
        s = 0.0
        for j in range(V):
            s += np.exp(z[i, j] - m)
        lse[i] = m + np.log(s)
        loss[i] = lse[i] - z[i, t[i]]
    return loss, lse


def xent_forward_ref(z, t):
    z64 = z.astype(np.float64)
    m = z64.max(axis=-1, keepdims=True)
    lse = (m + np.log(np.exp(z64 - m).sum(axis=-1, keepdims=True)))[:, 0]
    return lse - z64[np.arange(len(t)), t], lse


@njit(parallel=True, **_JIT)
def xent_backward(z, t, lse, coef):
    """dL/dz_i = coef_i * (softmax(z_i) - onehot(t_i)), where coef_i = dL/dloss_i."""
    N, V = z.shape
    dz = np.empty_like(z)
    for i in prange(N):
        for j in range(V):
            dz[i, j] = np.exp(z[i, j] - lse[i]) * coef[i]
        dz[i, t[i]] -= coef[i]
    return dz


def xent_backward_ref(z, t, lse, coef):
    p = np.exp(z.astype(np.float64) - lse[:, None])
    p[np.arange(len(t)), t] -= 1.0
    return (p * coef[:, None]).astype(z.dtype)


# ---------------------------------------------------------------------------------------------
# embedding backward: scatter-add rows of the upstream gradient into the table (indices repeat)
# ---------------------------------------------------------------------------------------------
@njit(**_JIT)
def embedding_backward(idx, g, V):
    """idx (N,) ints, g (N, C) -> dW (V, C) with dW[v] = sum of g[i] over i where idx[i] == v."""
    N, C = g.shape
    dW = np.zeros((V, C), dtype=g.dtype)
    for i in range(N):
        row = idx[i]
        for j in range(C):
            dW[row, j] += g[i, j]
    return dW


def embedding_backward_ref(idx, g, V):
    dW = np.zeros((V, g.shape[1]), dtype=g.dtype)
    np.add.at(dW, idx, g)
    return dW


# ---------------------------------------------------------------------------------------------
# Multi-head attention, flash-attention style (§2.2: the transformer's attention)
#
#   S = Q K^T / sqrt(D),  masked where key j > query i + q_offset (causal),  P = softmax(S),  O = P V
#
# Q, K, V are (BH, T, D): batch and heads flattened, each head's rows contiguous. The forward walks
# key tiles with an online softmax (running max m and denominator l per query row), so only a
# (TILE, TILE) block of S exists at any time, and saves lse = m + log(l) per row for backward.
# q_offset places the queries after q_offset earlier positions (incremental decoding with a KV cache).
# ---------------------------------------------------------------------------------------------
TILE = 64


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
        m = np.full(i1 - i0, -np.inf)
        l = np.zeros(i1 - i0)
        acc = np.zeros((i1 - i0, D), dtype=q.dtype)
        k_end = min(Tk, i1 + q_offset) if causal else Tk           # keys any row of the tile sees
        for j0 in range(0, k_end, TILE):
            j1 = min(j0 + TILE, k_end)
            S = np.dot(Qi, k[bh, j0:j1].T)                         # (bq, bk)
            for a in range(i1 - i0):
                row_max = -np.inf
                for b in range(j1 - j0):
                    if causal and j0 + b > i0 + a + q_offset:
                        S[a, b] = -np.inf
                    else:
                        S[a, b] *= scale
                        row_max = max(row_max, np.float64(S[a, b]))
                m_new = max(m[a], row_max)
                corr = np.exp(m[a] - m_new)                        # rescales what was summed so far
                row_sum = 0.0
                for b in range(j1 - j0):
                    p = np.exp(S[a, b] - m_new)
                    S[a, b] = p
                    row_sum += p
                l[a] = l[a] * corr + row_sum
                m[a] = m_new
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
                for a in range(i1 - i0):
                    for b in range(j1 - j0):
                        if causal and j0 + b > i0 + a + q_offset:
                            P[a, b] = 0.0
                        else:
                            P[a, b] = np.exp(P[a, b] * scale - lse[bh, i0 + a])
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
