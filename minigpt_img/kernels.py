"""numba kernels for the hot loops, each beside a plain NumPy `*_ref` twin that states what it computes.

The twins are the specification: tests compare each kernel with its twin on awkward shapes (one row,
odd widths, batch 1) in float32 and float64. row_max has no twin of its own because NumPy already
is one (np.max). gemm is BLAS's matrix product called from inside other kernels (attention's tiles,
rows_matmul's blocks of rows). The exp the kernels call is in exp_kernels.py, the palette's kernels
in palette_kernels.py. The engine (ops.py) calls the kernels; the twins are for reading
(reference.py builds the whole forward pass from them) and testing. The norm's and the
cross-entropy's row sums (and the norm's weight gradient) are accumulated in float64 whatever the
input dtype; the activation, the exp and the embedding's scatter-add work in the input's dtype.
Kernels take C-contiguous arrays (ops.py makes them so; gemm also takes views whose rows are spaced
by a pitch) and are deterministic: where rows are split across threads, the split is a fixed number
of chunks, so results do not depend on the thread count (rows_matmul splits by threads, and each
row's result is one BLAS call's: the same for any split where BLAS runs its blocked kernels, as on
every weight of the models here; BLAS may take other kernels for products of a few thousand
multiply-adds).

Dimension legend: N rows (B*T flattened), C width, V palette/vocabulary size.

With NUMBA_DISABLE_JIT=1 every kernel runs as plain Python (gemm as its twin): slow, but the same results.
"""
import numpy as np
import numba
from numba import njit, prange, types

from .exp_kernels import exp_shifted
from .jit import _JIT
from .threads import serial_kernel_blas

# Gradients summed over rows (norm weight) are reduced over this many fixed row chunks.
_N_CHUNKS = 64

GELU2_K = 1.702  # the iGPT activation x * sigmoid(1.702 x)


def logsumexp(z: np.ndarray, axis: int = -1) -> np.ndarray:
    """log sum_j exp(z_j) over axis (kept, size 1), computed stably as m + log sum_j exp(z_j - m)
    with m = max_j z_j. The one NumPy softmax of the package: softmax(z) = exp(z - logsumexp(z)),
    log_softmax(z) = z - logsumexp(z) (ops, the twins below, attention's twin, the probe, sampling)."""
    m = z.max(axis=axis, keepdims=True)
    return m + np.log(np.exp(z - m).sum(axis=axis, keepdims=True))


@njit(**_JIT)
def row_max(row, n):
    """max(row[:n]), n >= 1, in eight running maxima, one per column mod 8, so that consecutive
    compares do not wait on each other and LLVM packs them into one SIMD compare-and-select.
    numba's max() checks for NaN at every element and does not vectorise, and neither does a single
    running maximum without the no-NaN fast-math flag (measured on an Intel Xeon, float32: 0.17-0.23
    ns per element at rows of 256-1024 against 0.7-0.9 for one running maximum). A NaN in the row
    may or may not come out, but it stays in the row itself."""
    m0 = m1 = m2 = m3 = m4 = m5 = m6 = m7 = row[0]
    c = 0
    while c + 8 <= n:
        v0, v1, v2, v3, v4, v5, v6, v7 = row[c], row[c + 1], row[c + 2], row[c + 3], \
            row[c + 4], row[c + 5], row[c + 6], row[c + 7]
        m0, m1, m2, m3 = (v0 if v0 > m0 else m0), (v1 if v1 > m1 else m1), \
            (v2 if v2 > m2 else m2), (v3 if v3 > m3 else m3)
        m4, m5, m6, m7 = (v4 if v4 > m4 else m4), (v5 if v5 > m5 else m5), \
            (v6 if v6 > m6 else m6), (v7 if v7 > m7 else m7)
        c += 8
    for r in range(c, n):                                          # the last n mod 8 columns
        v = row[r]
        m0 = v if v > m0 else m0
    m0, m1, m2, m3 = (m4 if m4 > m0 else m0), (m5 if m5 > m1 else m1), \
        (m6 if m6 > m2 else m2), (m7 if m7 > m3 else m3)
    m0, m1 = (m2 if m2 > m0 else m0), (m3 if m3 > m1 else m1)
    return m1 if m1 > m0 else m0


# ---------------------------------------------------------------------------------------------
# GEMM from inside a kernel:  c = op(a) op(b) + beta c,   op(x) = x or x^T
#
# np.dot inside @njit copies any operand that is not contiguous and overwrites its output; this
# calls the same BLAS routine (numba's own entry point numba_xxgemm, which goes to
# scipy.linalg.cython_blas) on views whose rows are contiguous but spaced by any pitch, such as one
# head's rows of the fused qkv (B, T, 3C): no copy in, and beta = 1 sums into the destination.
# BLAS is column-major: a row-major (M, N) array with pitch ld is its (N, M) transpose, so
# c^T = op(b)^T op(a)^T is asked for, with the operands' roles swapped.
# ---------------------------------------------------------------------------------------------
_XXGEMM = types.ExternalFunction("numba_xxgemm", types.intc(
    types.char, types.char, types.char,                      # kind 's' / 'd', transa, transb
    types.intp, types.intp, types.intp,                      # m, n, k
    types.voidptr, types.voidptr, types.intp,                # alpha, a, lda
    types.voidptr, types.intp, types.voidptr,                # b, ldb, beta
    types.voidptr, types.intp))                              # c, ldc


@njit(**_JIT)
def _pitch(x):
    """The distance between x's rows in elements, checked: rows contiguous and not overlapping."""
    rows, cols = x.shape
    if cols > 1 and x.strides[1] != x.itemsize or rows > 1 and x.strides[0] < cols * x.itemsize:
        raise ValueError("gemm takes 2-D arrays whose rows are contiguous")
    return max(1, x.strides[0] // x.itemsize if rows > 1 else cols)


@njit(**_JIT)
def _gemm_blas(a, b, c, trans_a, trans_b, beta):
    """c (M, N) = op(a) op(b) + beta c, in place; a, b, c 2-D float32 or float64 arrays of one dtype
    whose rows are contiguous (any pitch). op(a) is (M, K), op(b) (K, N). beta = 0 ignores what c
    held (NaN included). Inside a parallel loop, BLAS must run on the calling thread: held at one
    thread (threads.serial_kernel_blas) or given products too small to start threads of its own
    (attention.tiles); otherwise every thread's product starts OpenBLAS's threads inside ours."""
    M, N = c.shape
    K = a.shape[0] if trans_a else a.shape[1]
    if (a.shape[1] if trans_a else a.shape[0]) != M or (b.shape[0] if trans_b else b.shape[1]) != N \
            or (b.shape[1] if trans_b else b.shape[0]) != K or a.itemsize != c.itemsize \
            or b.itemsize != c.itemsize:
        raise ValueError("gemm: the operands' shapes or dtypes do not match")  # BLAS would read past them
    lda, ldb, ldc = _pitch(a), _pitch(b), _pitch(c)
    if M == 0 or N == 0:
        return
    scalars = np.empty(2, dtype=c.dtype)                                # alpha, beta
    scalars[0], scalars[1] = 1.0, beta
    kind = ord("s") if c.itemsize == 4 else ord("d")
    no, yes = ord("N"), ord("T")
    _XXGEMM(kind, yes if trans_b else no, yes if trans_a else no, N, M, K,
            scalars[0:].ctypes, b.ctypes, ldb, a.ctypes, lda, scalars[1:].ctypes, c.ctypes, ldc)
    scalars[0] = 0.0  # used after the call, so the scalars outlive it


def gemm_ref(a, b, c, trans_a, trans_b, beta):
    for x in (a, b, c):
        _pitch(x)                                                       # the same arrays accepted
    product = (a.T if trans_a else a) @ (b.T if trans_b else b)
    c[...] = product + beta * c if beta != 0 else product


# numba's BLAS entry point only exists in compiled code: with NUMBA_DISABLE_JIT=1 the twin runs
gemm = gemm_ref if numba.config.DISABLE_JIT else _gemm_blas


# ---------------------------------------------------------------------------------------------
# A product of many rows on numba's threads:  out = a b,  out[R_p] = a[R_p] b   (R_p: blocks of rows)
# One BLAS call per block, each on its own thread of numba's pool with BLAS held at one thread
# (threads.serial_kernel_blas). Then a process runs one thread pool, not two: NumPy's OpenBLAS keeps
# its threads spinning after each product for as long as it was told when it loaded (OPENBLAS_THREAD_
# TIMEOUT, ~0.1 s unset), and in a script that imported NumPy before threads.configure, the spinners
# take the cores from the numba kernels in between (measured on an Intel Xeon, 2 threads: a layer's
# attention 1.5x slower after a NumPy product; features of 8 images at iGPT-S size from a script that
# imported NumPy first 10.2 -> 8.4 s, after threads.configure level, 7.3 -> 7.4 s). ops.MatMul uses
# it outside the graph only, for products of at least MANY_ROWS rows: with fewer, OpenBLAS's own
# threads, which pack the weight once for all of them, were faster where the spin settings were in
# effect (a forward pass of one image at iGPT-S size, 1,024 rows, 4% slower as blocks; 4,096 and
# 8,192 rows level). A training step's products stay on NumPy's BLAS (see ops.MatMul). A row's
# result is one BLAS call's sum over k, so a block's rows come out as from one product.
# ---------------------------------------------------------------------------------------------
MANY_ROWS = 4096     # ops.MatMul sends products outside the graph with at least this many rows here
MIN_BLOCK_ROWS = 64  # fewer rows per thread than this: fewer blocks


def rows_matmul(a, b):
    """a (M, K), b (K, N), rows contiguous, one dtype -> a @ b (M, N), M in min(threads,
    M / MIN_BLOCK_ROWS) blocks of rows; NumPy's product where the kernels' BLAS cannot be held at
    one thread (it would start threads of its own inside each block)."""
    if not serial_kernel_blas():
        return a @ b
    return _rows_matmul(a, b, max(1, min(numba.get_num_threads(), a.shape[0] // MIN_BLOCK_ROWS)))


@njit(parallel=True, **_JIT)
def _rows_matmul(a, b, blocks):
    M, N = a.shape[0], b.shape[1]
    out = np.empty((M, N), dtype=a.dtype)                                # (M, N)
    for p in prange(blocks):
        r0, r1 = M * p // blocks, M * (p + 1) // blocks                  # this block's rows
        gemm(a[r0:r1], b, out[r0:r1], False, False, 0.0)
    return out


def rows_matmul_ref(a, b):
    return a @ b


# ---------------------------------------------------------------------------------------------
# iGPT norm:  y = x / sqrt(mean(x^2) + eps) * g        (no mean-centring, no bias)
# departure (released iGPT): the paper's §2.2 says "layer_norm"; the released code's norm has no
# mean and no bias, as Hugging Face's ImageGPTLayerNorm
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
# departure (released iGPT): the paper's §2.2 uses "the GPT-2 formulation", whose mlp has GPT-2's gelu
# ---------------------------------------------------------------------------------------------
_CHUNK = 4096  # elements per parallel work item in the elementwise kernels


@njit(**_JIT)
def _gelu2_exp(x, e):
    """e[:] = exp(-1.702 |x|) <= 1, which never overflows; the activation's loops then take
    sigmoid(1.702 x) = 1 / (1 + e) for x >= 0 and e / (1 + e) for x < 0 in the same pass as what
    they compute from it. In x's precision throughout (a float64 constant would widen every float32
    element: measured 10-25% of the activation's time)."""
    for i in range(x.size):
        e[i] = abs(x[i])
    exp_shifted(e, x.size, -GELU2_K, 0.0)


@njit(inline="always", **_JIT)
def _gelu2_sigmoid(x, e, one):
    """sigmoid(1.702 x) of one element from its e = exp(-1.702 |x|); one: 1 in x's dtype. Inlined
    into the loops that call it, which stay vectorised."""
    return (one if x >= 0 else e) / (one + e)


# The parallel loops below hand each chunk to a function of its own: the same loops written as the
# body of the prange loop compile to slower code (measured on an Intel Xeon, 2 threads, 2M float32
# elements: forward 0.63 -> 0.46 ns per element, backward 0.74 -> 0.53).
@njit(parallel=True, **_JIT)
def gelu2_forward(x):
    """x (n,) flat -> y (n,) = x sigmoid(1.702 x), released iGPT's activation."""
    n = x.size
    y = np.empty_like(x)
    for c in prange((n + _CHUNK - 1) // _CHUNK):
        lo, hi = c * _CHUNK, min(n, (c + 1) * _CHUNK)
        e = np.empty(hi - lo, x.dtype)                             # exp in x's precision
        _gelu2_chunk(x[lo:hi], y[lo:hi], e)
    return y


@njit(**_JIT)
def _gelu2_chunk(x, y, e):
    """y[:] = x sigmoid(1.702 x) for 1-D x, y (y may be x: in place); e: scratch of x.size."""
    one = x.dtype.type(1.0)
    _gelu2_exp(x, e)
    for i in range(x.size):
        y[i] = x[i] * _gelu2_sigmoid(x[i], e[i], one)


def _sigmoid_ref(z):
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # = 1 / (1 + exp(-z)), without overflow warnings


def gelu2_forward_ref(x):
    return (x * _sigmoid_ref(GELU2_K * x)).astype(x.dtype)


@njit(parallel=True, **_JIT)
def gelu2_backward(dy, x):
    """dy/dx of x * s(kx) is s + k x s (1 - s), with s = sigmoid(k x)."""
    n = x.size
    dx = np.empty_like(x)
    for c in prange((n + _CHUNK - 1) // _CHUNK):
        lo, hi = c * _CHUNK, min(n, (c + 1) * _CHUNK)
        e = np.empty(hi - lo, x.dtype)
        _gelu2_grad_chunk(dy[lo:hi], x[lo:hi], dx[lo:hi], e)
    return dx


@njit(**_JIT)
def _gelu2_grad_chunk(dy, x, dx, e):
    """dx[:] = dy (s + k x s (1 - s)), s = sigmoid(k x), for 1-D chunks; e: scratch of x.size."""
    k, one = x.dtype.type(GELU2_K), x.dtype.type(1.0)
    _gelu2_exp(x, e)
    for i in range(x.size):
        s = _gelu2_sigmoid(x[i], e[i], one)
        dx[i] = dy[i] * (s + k * x[i] * s * (one - s))


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
    for c in prange(min(N, _N_CHUNKS)):
        e = np.empty(V, dtype=z.dtype)                             # exp in z's precision
        for i in range(c * N // min(N, _N_CHUNKS), (c + 1) * N // min(N, _N_CHUNKS)):
            m = row_max(z[i], V)                                   # exact in z's dtype: z_ij - m <= 0
            e[:] = z[i]
            exp_shifted(e, V, 1.0, m)
            total = 0.0                                            # sum_j exp(z_ij - m) in float64
            for j in range(V):
                total += e[j]
            lse[i] = np.float64(m) + np.log(total)
            loss[i] = lse[i] - z[i, t[i]]
    return loss, lse


def xent_forward_ref(z, t):
    z64 = z.astype(np.float64)
    lse = logsumexp(z64)[:, 0]
    return lse - z64[np.arange(len(t)), t], lse


@njit(parallel=True, **_JIT)
def xent_backward(z, t, lse, coef):
    """dL/dz_i = coef_i * (softmax(z_i) - onehot(t_i)), where coef_i = dL/dloss_i."""
    N, V = z.shape
    dz = np.empty_like(z)
    for c in prange(min(N, _N_CHUNKS)):
        e = np.empty(V, dtype=z.dtype)                             # exp in z's precision
        for i in range(c * N // min(N, _N_CHUNKS), (c + 1) * N // min(N, _N_CHUNKS)):
            e[:] = z[i]
            exp_shifted(e, V, 1.0, lse[i])                         # lse rounded to z's precision
            for j in range(V):
                dz[i, j] = e[j] * coef[i]
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

