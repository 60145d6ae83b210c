"""numba kernels of a decoding step: §2.2's transformer applied to a few new tokens (one per image
when sampling, the paper's Figure 1), each beside its NumPy *_ref twin.

A decoding step multiplies a few rows by every weight matrix of the model: each weight is read once
from memory for a few multiply-adds, so a step costs the weights' bytes over the memory bandwidth
(300 MB at iGPT-S size), and these kernels are written to stream each weight once, in long
contiguous stretches, with few parallel loops per layer (each one a wake-up of the thread pool):

    few_rows_matmul(x, W)      x W                                 (ops.MatMul, <= FEW_ROWS rows)
    few_rows_mlp(x, ...)       gelu2(x W_fc + b_fc) W_proj + b_proj  the MLP sub-layer, two loops
    few_rows_partials(x, W)    the partial products x[:, K_s] W[K_s, :] the sub-layers start from
                               (attention.decode_layer, the attention sub-layer, is the other user)

Sums over blocks are taken in a fixed block order, so results do not depend on the thread count.
Legend: M rows (B * T flattened, a few), K inputs, N outputs, C width, H = 4C hidden units.
"""
import numpy as np
from numba import njit, prange

from .jit import _JIT
from .kernels import _gelu2_chunk, gelu2_forward_ref

# ---------------------------------------------------------------------------------------------
# few-row matmul:  out = x W = sum_s x[:, K_s] W[K_s, :]      (K_s: blocks of W's rows)
# The weight's rows are cut into ROW_BLOCKS blocks, each one contiguous stretch of memory
# that one thread streams, eight rows at a time, into its own (M, N) partial sum; the partial sums are
# then added in block order. Measured on iGPT-S's weights (AMD EPYC, 2 threads): contiguous row
# blocks stream at 17-21 GB/s where blocks of columns (every thread reading a part of every row)
# reach 8.5-16; on an Intel Xeon the MLP in blocks of 128-1,024 columns of W_fc (one parallel loop,
# no partial sums) was level, 19-21 GB/s against 19-22. The fixed block count makes the sums the
# same whatever the thread count.
# ---------------------------------------------------------------------------------------------
FEW_ROWS = 16  # ops.MatMul sends products with at most this many rows here (measured: M = 4 1.5x BLAS, 16 even)
ROW_BLOCKS = 8


@njit(**_JIT)
def few_rows_times(x, W, k0, k1, acc):
    """acc (M, N) += x[:, k0:k1] @ W[k0:k1] on the calling thread: W's rows read eight at a time,
    each element multiplied into two rows of acc while it is in a register (measured on an Intel
    Xeon, streaming iGPT-S's MLP projection, 2048 x 512: 16.5 GB/s four rows at a time, 18.2 eight;
    its 512 x 2048 expansion 19 either way)."""
    M = x.shape[0]
    N = W.shape[1]
    k = k0
    while k + 8 <= k1:
        w0, w1, w2, w3 = W[k], W[k + 1], W[k + 2], W[k + 3]
        w4, w5, w6, w7 = W[k + 4], W[k + 5], W[k + 6], W[k + 7]
        for m in range(0, M, 2):
            last = min(m + 1, M - 1)                              # an odd last row: its pair is itself
            a0, a1, a2, a3 = x[m, k], x[m, k + 1], x[m, k + 2], x[m, k + 3]
            a4, a5, a6, a7 = x[m, k + 4], x[m, k + 5], x[m, k + 6], x[m, k + 7]
            b0, b1, b2, b3 = x[last, k], x[last, k + 1], x[last, k + 2], x[last, k + 3]
            b4, b5, b6, b7 = x[last, k + 4], x[last, k + 5], x[last, k + 6], x[last, k + 7]
            acc_a, acc_b = acc[m], acc[last]
            if last == m:
                for c in range(N):
                    acc_a[c] += (a0 * w0[c] + a1 * w1[c] + a2 * w2[c] + a3 * w3[c]) + \
                        (a4 * w4[c] + a5 * w5[c] + a6 * w6[c] + a7 * w7[c])
                continue
            for c in range(N):
                v0, v1, v2, v3, v4, v5, v6, v7 = w0[c], w1[c], w2[c], w3[c], w4[c], w5[c], w6[c], w7[c]
                acc_a[c] += (a0 * v0 + a1 * v1 + a2 * v2 + a3 * v3) + (a4 * v4 + a5 * v5 + a6 * v6 + a7 * v7)
                acc_b[c] += (b0 * v0 + b1 * v1 + b2 * v2 + b3 * v3) + (b4 * v4 + b5 * v5 + b6 * v6 + b7 * v7)
        k += 8
    for k in range(k, k1):                                        # the last (k1 - k0) mod 8 rows of W
        for m in range(M):
            a0 = x[m, k]
            for c in range(N):
                acc[m, c] += a0 * W[k, c]


@njit(parallel=True, **_JIT)
def few_rows_partials(x, W):
    """x (M, K), W (K, N), C-contiguous, one dtype -> (ROW_BLOCKS, M, N): block s's partial product
    x[:, K_s] W[K_s, :], one parallel loop over the blocks."""
    M, K = x.shape
    N = W.shape[1]
    block = -(-K // ROW_BLOCKS)
    partials = np.empty((ROW_BLOCKS, M, N), dtype=x.dtype)
    for s in prange(ROW_BLOCKS):
        p = partials[s]
        p[:] = 0.0
        few_rows_times(x, W, min(K, s * block), min(K, (s + 1) * block), p)
    return partials


# (An array expression in a parallel kernel is a parallel loop of its own, a wake-up of the pool: so
# the kernels here allocate with np.empty outside prange and leave sums to this serial kernel.)
@njit(**_JIT)
def sum_shares(shares, bias):
    """shares (S, M, N), bias (N,) or None -> (M, N) = bias + shares[0] + shares[1] + ..., in that order."""
    S, M, N = shares.shape
    y = np.zeros((M, N), dtype=shares.dtype)
    for m in range(M):
        if bias is not None:
            y[m] = bias
        for t in range(S):
            for c in range(N):
                y[m, c] += shares[t, m, c]
    return y


@njit(**_JIT)
def sum_partials(partials, bias, c0, c1, out):
    """out (M, c1 - c0) = bias[c0:c1] (when not None) + partials[0, :, c0:c1] + partials[1, :, c0:c1]
    + ..., in block order: columns c0 .. c1 - 1 of a product from few_rows_partials."""
    S, M = partials.shape[:2]
    for m in range(M):
        if bias is not None:
            out[m] = bias[c0:c1]
        else:
            out[m] = 0.0
        for s in range(S):
            for c in range(c1 - c0):
                out[m, c] += partials[s, m, c0 + c]


def few_rows_matmul(x, W):
    """x (M, K) @ W (K, N), both C-contiguous and of one dtype -> (M, N)."""
    return sum_shares(few_rows_partials(x, W), None)


def few_rows_matmul_ref(x, W):
    return x @ W


# The MLP sub-layer of a decoding step: two parallel loops, the second starting from the first's
# partial sums, with the activation in between done by the threads of the second:
#
#   y = gelu2(x W_fc + b_fc) W_proj + b_proj = sum_t gelu2(x W_fc[:, t] + b_fc[t]) W_proj[t, :] + b_proj
#
# t runs over blocks of hidden units (MLP_BLOCKS, or fewer so that each has at least MLP_UNITS: a
# small model's blocks would be all overhead); block t sums its units' partials, adds the bias,
# applies gelu2 and multiplies them into its share of y (rows t of W_proj: contiguous). The shares
# are summed in block order; the block count depends on H only.
MLP_BLOCKS, MLP_UNITS = 16, 128


def few_rows_mlp(x, W_fc, b_fc, W_proj, b_proj):
    """x (M, C), W_fc (C, H), W_proj (H, C), C-contiguous, biases (H,), (C,) or None -> y (M, C)."""
    return _mlp_from_partials(few_rows_partials(x, W_fc), b_fc, W_proj, b_proj)


@njit(parallel=True, **_JIT)
def _mlp_from_partials(partials, b_fc, W_proj, b_proj):
    M, H = partials.shape[1:]
    C = W_proj.shape[1]
    blocks = max(1, min(MLP_BLOCKS, H // MLP_UNITS))
    block = -(-H // blocks)
    shares = np.empty((blocks, M, C), dtype=partials.dtype)
    for t in prange(blocks):
        h0, h1 = min(H, t * block), min(H, (t + 1) * block)
        u = np.empty((M, h1 - h0), dtype=partials.dtype)         # (M, block) this block's units
        sum_partials(partials, b_fc, h0, h1, u)
        flat = u.reshape(M * (h1 - h0))                           # gelu2 in place
        _gelu2_chunk(flat, flat, np.empty_like(flat))
        share = shares[t]                                         # (M, C) this block's share
        share[:] = 0.0
        few_rows_times(u, W_proj[h0:h1], 0, h1 - h0, share)
    return sum_shares(shares, b_proj)


def few_rows_mlp_ref(x, W_fc, b_fc, W_proj, b_proj):
    u = gelu2_forward_ref(x @ W_fc + (0 if b_fc is None else b_fc))
    return u @ W_proj + (0 if b_proj is None else b_proj)
