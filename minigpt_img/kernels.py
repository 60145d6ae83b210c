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
