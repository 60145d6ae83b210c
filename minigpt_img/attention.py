"""§2.2 attention as numba kernels, flash-attention style, each beside its NumPy *_ref twin.

    S = Q K^T / sqrt(D),  masked where key j > query i + q_offset (causal),  P = softmax(S),  O = P V

Q, K, V come as (B, T, NH, D) views whose rows of D are contiguous, any other strides: the three
thirds of the fused projection qkv (B, T, 3C) seen through heads(), or a KV cache. Nothing is split,
copied or merged per head: the tile GEMMs (kernels.gemm) read one head's rows in place through their
pitch (but K^T, copied per head in the forward and per key tile with V^T in the backward: see
_backward_block), the forward writes O straight into the (B, T, C) layout the next projection reads,
and the backward sums dQ, dK, dV straight into the fused gradient (B, T, 3C). The forward walks key
tiles with an online softmax (running max m and denominator l per query row), so only a (TQ, TK)
block of S exists at any time, and saves lse = m + log(l) per row for backward. A row's scale, shift,
exp and sum take one pass (exp_kernels.exp_shifted), in the forward and in the backward,
which rebuilds P = exp(S / sqrt(D) - lse). q_offset places the queries after q_offset earlier
positions (incremental decoding with a KV cache). Decoding a token or a few reads a head-major cache
(B, NH, n_ctx, D) in place instead: decode_layer runs the whole sub-layer (projections, cache,
attention) for a few rows in two parallel loops, attention_decode the attention alone for more. The
*_ref twins materialise the whole (Tq, Tk) matrix per head: the specification the tests check.

Legend: B batch, T tokens, NH heads, D = C / NH head size, BH = B * NH.
"""
import numpy as np
from numba import njit, prange

from .decode_kernels import few_rows_partials, few_rows_times, sum_partials, sum_shares
from .exp_kernels import exp_shifted
from .jit import _JIT
from .kernels import gemm, logsumexp, row_max
from .threads import serial_kernel_blas


def heads(qkv: np.ndarray, n_head: int):
    """(B, T, 3C) fused projections -> q, k, v, each a (B, T, NH, D) view (no copy), D = C / NH."""
    B, T, C3 = qkv.shape
    qkv5 = qkv.reshape(B, T, 3, n_head, C3 // 3 // n_head)                    # (B, T, 3, NH, D)
    return qkv5[:, :, 0], qkv5[:, :, 1], qkv5[:, :, 2]


# Tiles: TQ query rows by TK keys. Every tile product is a BLAS GEMM of TQ * TK * D multiply-adds,
# called from inside our own parallel loop, so it must run on the calling thread. When the kernels'
# BLAS can be kept at one thread (threads.serial_kernel_blas: kernels.gemm calls SciPy's OpenBLAS,
# a library apart from NumPy's), the backward's tiles are 128 x 128 (the forward's: forward_tiles):
# measured single-threaded against 64 x 128, 5% faster forward + backward at T = 256, D = 32 and
# 13% at T = 1024, D = 64 (a GEMM with 128 rows runs at 56-65 GFLOP/s here, with 64 at 35).
# Otherwise they stay small enough that OpenBLAS does not start threads of its own (m n k <= 2^18:
# at 2^19 it did, inside ours, and a layer's forward took 60x longer): TQ = 64 and TK = 128 for
# D <= 32, 64 for D = 64, 32 for D = 128.
GEMM_ONE_THREAD = 1 << 18


def tiles(D: int) -> tuple[int, int]:
    """(TQ, TK) for head size D, as the comment above says: the backward kernel's last two arguments
    (the forward's: forward_tiles)."""
    return (128, 128) if serial_kernel_blas() else one_thread_tiles(D)


FORWARD_KEYS = 4096  # the forward's widest key tile (2 MB of scores per thread at TQ = 128)


def forward_tiles(D: int, Tk: int) -> tuple[int, int]:
    """(TQ, TK) for the forward pass over Tk keys: where the kernels' BLAS runs on one thread, a key
    tile holds every key (up to FORWARD_KEYS), so each query tile's softmax is exact in one pass, with
    fewer and larger GEMMs. Measured against the kernel before (online softmax over 128 x 128 tiles;
    2026-12-03, alternately, AMD EPYC), one thread / two: 12.5 -> 10.7 / 10.7 -> 9.3 ms at micro's
    shape (B=16, 4 heads, T=256, D=32; TQ = 64), 65.4 -> 60.5 / 32.8 -> 30.4 ms at T = 1024, D = 32,
    56.0 -> 52.6 / 27.5 -> 25.7 ms at D = 64 (TQ = 128), 359 -> 332 / 219 -> 170 ms at T = 4096. The
    backward keeps 128 x 128 (tiles()): measured, 256 x 128, 256 x 256, 64 x 128 and 128 x 64 were
    2-25% slower."""
    if not serial_kernel_blas():
        return one_thread_tiles(D)
    return (64 if Tk <= 256 else 128), min(Tk, FORWARD_KEYS)



def one_thread_tiles(D: int) -> tuple[int, int]:
    """Tiles whose GEMMs OpenBLAS runs on the calling thread whatever its thread count."""
    return 64, max(8, min(128, GEMM_ONE_THREAD // (64 * D)))


@njit(**_JIT)
def _visible(a, i0, j0, bk, causal, q_offset):
    """How many of the bk keys j0, j0+1, ... query row i0 + a may see (keys j <= i + q_offset)."""
    if not causal:
        return bk
    return max(0, min(bk, i0 + a + q_offset - j0 + 1))


@njit(parallel=True, **_JIT)
def attention_forward(q, k, v, causal, q_offset, TQ, TK):
    """q (B, Tq, NH, D), k, v (B, Tk, NH, D), rows of D contiguous -> o (B, Tq, NH, D) C-contiguous
    (so o.reshape(B, Tq, C) has the heads side by side) and lse (B, NH, Tq) = log sum_j exp(S_ij).
    Tiles are computed in the inputs' precision (float32 SIMD for float32); row statistics m, l
    in float64. TQ, TK: the tile (forward_tiles()). Each head is one call of _forward_head: a
    function of its own, not the body of the parallel loop, which numba compiles to slower code
    (measured on an Intel Xeon, 2 threads, the same results bit for bit: 3.5 -> 2.9 ms at micro's
    shape, B=16, 4 heads, T=256, D=32; 29 -> 21 ms at T = 1024, D = 32; 8.6 -> 6.8 ms at D = 64)."""
    B, Tq, NH, D = q.shape
    Tk = k.shape[1]
    o = np.empty((B, Tq, NH, D), dtype=q.dtype)
    lse = np.empty((B, NH, Tq), dtype=q.dtype)
    k_len = min(Tk, Tq + q_offset) if causal else Tk               # keys any query sees
    TK = min(TK, max(k_len, 1))
    for bh in prange(B * NH):  # whole heads per thread: equal work each, causal or not
        b, h = bh // NH, bh % NH
        S_buf, KT_buf = np.empty(TQ * TK, dtype=q.dtype), np.empty(D * k_len, dtype=q.dtype)
        m_buf, l_buf = np.empty(TQ), np.empty(TQ)                  # running row max of S, sum of exp(S - m)
        _forward_head(q[b, :, h], k[b, :, h], v[b, :, h], causal, q_offset, TQ, TK, o[b, :, h], lse[b, h],
                      S_buf, KT_buf, m_buf, l_buf)
    return o, lse


@njit(**_JIT)
def _forward_head(Qh, Kh, Vh, causal, q_offset, TQ, TK, Oh, lse_h, S_buf, KT_buf, m_buf, l_buf):
    """attention_forward for one head: Qh (Tq, D), Kh, Vh (Tk, D) read in place -> Oh (Tq, D) and
    lse_h (Tq,) written in place; S_buf: scratch of TQ * TK, KT_buf of D times the keys any query
    sees (their K^T, copied once per head so that S is a product of untransposed operands, as in
    _backward_block: measured on an Intel Xeon at micro's shape, the forward 0.88x the time), m_buf,
    l_buf of TQ. When one key tile holds every key a query tile sees, its softmax is exact in one pass
    (the first tile's case in _online_softmax), with no rescaling."""
    Tq, D = Qh.shape
    k_len = KT_buf.size // D                                           # keys any query sees
    KT = KT_buf.reshape(D, k_len)                                      # (D, k_len) = K^T
    _transpose(Kh[:k_len], KT)
    scale = Qh.dtype.type(1.0 / np.sqrt(D))
    for i0 in range(0, Tq, TQ):
        i1 = min(i0 + TQ, Tq)
        bq = i1 - i0
        Qi, Oi = Qh[i0:i1], Oh[i0:i1]                                  # (bq, D); Oi sums exp(S - m) V
        m, l = m_buf[:bq], l_buf[:bq]
        k_end = min(k_len, i1 + q_offset) if causal else k_len         # keys any row of the tile sees
        for j0 in range(0, k_end, TK):
            j1 = min(j0 + TK, k_end)
            bk = j1 - j0
            S = S_buf[:bq * bk].reshape(bq, bk)
            gemm(Qi, KT[:, j0:j1], S, False, False, 0.0)               # (bq, bk) = Q_i K_j^T
            _online_softmax(S, m, l, Oi, scale, i0, j0, causal, q_offset)  # S -> exp(S * scale - m)
            gemm(S, Vh[j0:j1], Oi, False, False, 0.0 if j0 == 0 else 1.0)  # O_i (+)= P V_j
        for a in range(bq):
            inv_l = Qh.dtype.type(1.0 / l[a])
            for d in range(D):
                Oi[a, d] *= inv_l
            lse_h[i0 + a] = m[a] + np.log(l[a])


@njit(**_JIT)
def _transpose(rows, out):
    """out (D, n) = rows (n, D)^T, rows any pitch, out contiguous, in blocks of 16 rows: each block's
    writes go to 16 consecutive elements of each of out's rows, and the fixed width (views, so no
    index can be negative) lets LLVM unroll it (measured on an Intel Xeon, 128 x 32 float32 from a
    head's rows: 0.20 ns an element against 0.52 for a variable-width block and 0.30 row by row)."""
    n, D = rows.shape
    c0 = 0
    while c0 + 16 <= n:
        block, out_block = rows[c0:c0 + 16], out[:, c0:c0 + 16]
        for d in range(D):
            for c in range(16):
                out_block[d, c] = block[c, d]
        c0 += 16
    for d in range(D):                                                 # the last n mod 16 rows
        for c in range(c0, n):
            out[d, c] = rows[c, d]


@njit(**_JIT)
def _online_softmax(S, m, l, Oi, scale, i0, j0, causal, q_offset):
    """The forward's softmax step on key tile j0 of query tile i0: S (bq, bk) -> P = exp(S * scale -
    m_new) for the keys each row sees, 0 for the others, with the running max m and denominator l of
    each row updated (and Oi and l rescaled by exp(m - m_new) after the first tile). A function of its
    own, called per tile, as _probabilities is, and for the same reason."""
    bq, bk = S.shape
    for a in range(bq):
        nb = _visible(a, i0, j0, bk, causal, q_offset)
        row = S[a]
        if j0 == 0:                                                    # the first tile: nothing to rescale
            m[a], l[a] = -np.inf, 0.0
        if nb > 0:
            m_new = max(m[a], np.float64(row_max(row, nb)) * scale)
            if j0 > 0:
                corr = np.exp(m[a] - m_new)                            # rescales what was summed so far
                l[a] *= corr
                Oi[a] *= Oi.dtype.type(corr)
            m[a] = m_new
            l[a] += exp_shifted(row, nb, scale, m_new)
        row[nb:] = 0.0                                                 # masked keys: exactly zero


DECODE_ROWS = 8  # ImageGPT.decode: a step of up to this many new tokens per image is a decoding step


@njit(**_JIT)
def _attend_cached(q, K, V, n, s, out):
    """One query against the first n cached positions, read in place: out (D,) = sum_j p_j V_j / sum_j p_j
    with p_j = exp(s_j - max s), s_j = K_j . q / sqrt(D), for q (D,) any stride, K, V (>= n, D)
    C-contiguous; s: scratch of at least n."""
    D = q.shape[0]
    scale = q.dtype.type(1.0 / np.sqrt(D))
    zero = q.dtype.type(0.0)
    qa = q * scale                                                     # (D,) contiguous
    m = -np.inf
    for j in range(n):                                                 # s = K q / sqrt(D)
        acc = zero
        for d in range(D):
            acc += K[j, d] * qa[d]
        s[j] = acc
        m = max(m, acc)
    sa = s[:n]
    l = exp_shifted(sa, n, 1.0, m)                                     # p = exp(s - max s), l = sum p
    out[:] = zero
    for j in range(n):                                                 # o = p V / sum p
        p = sa[j]
        for d in range(D):
            out[d] += p * V[j, d]
    for d in range(D):
        out[d] /= l


@njit(parallel=True, **_JIT)
def attention_decode(q, k_cache, v_cache, q_offset):
    """Decoding with a KV cache: a few queries q (B, Tq, NH, D), any strides, placed after q_offset
    cached positions, against the head-major cache k_cache, v_cache (B, NH, n_ctx, D), C-contiguous,
    holding at least q_offset + Tq positions -> o (B, Tq, NH, D) C-contiguous; causal. Each head's
    keys are one contiguous block read in place, once per query (_attend_cached). Plain loops, no
    BLAS: a matrix-vector product this size would start BLAS's own threads inside ours.
    Specification: attention_forward_ref on the cache's first positions."""
    B, Tq, NH, D = q.shape
    o = np.empty((B, Tq, NH, D), dtype=q.dtype)
    for bh in prange(B * NH):
        b, h = bh // NH, bh % NH
        n = q_offset + Tq                                              # keys any query sees
        s = np.empty(n, dtype=q.dtype)
        for a in range(Tq):                                            # keys j <= i + q_offset
            _attend_cached(q[b, a, h], k_cache[b, h], v_cache[b, h], q_offset + a + 1, s, o[b, a, h])
    return o


# The attention sub-layer of a decoding step of a few rows: two parallel loops. The first is the
# product x W_attn in row blocks (decode_kernels.few_rows_partials); the second takes a head per iteration:
# the head's q, k, v from the partial sums of its columns (plus the bias), its keys and values into
# the cache, its attention over the cache, and its share of c_proj (its rows of W_proj: contiguous):
#
#   y = c_proj(attention) = sum_h o_h W_proj[h D:(h + 1) D, :] + b_proj,  o_h = softmax(q_h K_h^T / sqrt(D)) V_h
#
# so every weight and every cached key is read once. The NH shares are summed in head order.
def decode_layer(x, W_attn, b_attn, W_proj, b_proj, k_cache, v_cache, q_offset):
    """x (B, Tq, C) C-contiguous: the normed new positions q_offset .. q_offset + Tq - 1; W_attn (C, 3C),
    W_proj (C, C) C-contiguous, biases (3C,), (C,) or None; k_cache, v_cache (B, NH, n_ctx, D)
    C-contiguous, written here at the new positions -> y (B, Tq, C), causal. Specification:
    decode_layer_ref."""
    B, Tq, C = x.shape
    partials = few_rows_partials(x.reshape(B * Tq, C), W_attn)             # (S, B Tq, 3C)
    y = _heads_from_partials(partials, b_attn, W_proj, b_proj, k_cache, v_cache, q_offset, Tq)
    return y.reshape(B, Tq, C)


@njit(parallel=True, **_JIT)
def _heads_from_partials(partials, b_attn, W_proj, b_proj, k_cache, v_cache, q_offset, Tq):
    M, C3 = partials.shape[1:]
    C = C3 // 3
    NH, D = k_cache.shape[1], k_cache.shape[3]
    shares = np.empty((NH, M, C), dtype=partials.dtype)                   # np.empty: see decode_kernels.sum_shares
    for h in prange(NH):
        qkv = np.empty((3, M, D), dtype=partials.dtype)                   # this head's q, k, v rows
        for part in range(3):
            c0 = part * C + h * D                                          # its columns of q, k, v
            sum_partials(partials, b_attn, c0, c0 + D, qkv[part])
        n = q_offset + Tq
        scores = np.empty(n, dtype=qkv.dtype)
        o = np.empty((M, D), dtype=qkv.dtype)                              # (B Tq, D)
        for b in range(M // Tq):
            for a in range(Tq):
                k_cache[b, h, q_offset + a] = qkv[1, b * Tq + a]
                v_cache[b, h, q_offset + a] = qkv[2, b * Tq + a]
            for a in range(Tq):                                            # keys j <= i + q_offset
                _attend_cached(qkv[0, b * Tq + a], k_cache[b, h], v_cache[b, h], q_offset + a + 1,
                               scores, o[b * Tq + a])
        share = shares[h]                                                  # (B Tq, C) this head's share
        share[:] = 0.0
        few_rows_times(o, W_proj[h * D:(h + 1) * D], 0, D, share)
    return sum_shares(shares, b_proj)


def decode_layer_ref(x, W_attn, b_attn, W_proj, b_proj, k_cache, v_cache, q_offset):
    B, Tq, C = x.shape
    qkv = x @ W_attn + (0 if b_attn is None else b_attn)                    # (B, Tq, 3C)
    q, k, v = heads(qkv, k_cache.shape[1])                                  # (B, Tq, NH, D)
    t1 = q_offset + Tq
    k_cache[:, :, q_offset:t1] = _per_head(k)
    v_cache[:, :, q_offset:t1] = _per_head(v)
    o, _ = attention_forward_ref(q, _per_head(k_cache[:, :, :t1]), _per_head(v_cache[:, :, :t1]), True, q_offset)
    return o.reshape(B, Tq, C) @ W_proj + (0 if b_proj is None else b_proj)


def _per_head(x):
    """(B, T, NH, D) -> (B, NH, T, D), the layout in which the twins do plain matrix products."""
    return np.swapaxes(x, 1, 2)


def _attention_probs_ref(q, k, causal, q_offset):
    D = q.shape[-1]
    S = (_per_head(q) @ np.swapaxes(_per_head(k), -1, -2)) / np.sqrt(D).astype(q.dtype)  # (B, NH, Tq, Tk)
    if causal:
        Tq, Tk = S.shape[-2:]
        S = np.where(np.arange(Tk)[None, :] > np.arange(Tq)[:, None] + q_offset, -np.inf, S)
    lse = logsumexp(S)                                                        # (B, NH, Tq, 1)
    return np.exp(S - lse), lse[..., 0]


def attention_forward_ref(q, k, v, causal, q_offset):
    """The materialised version: the whole (Tq, Tk) matrix per head."""
    P, lse = _attention_probs_ref(q, k, causal, q_offset)
    return _per_head(P @ _per_head(v)).astype(q.dtype), lse.astype(q.dtype)


@njit(parallel=True, **_JIT)
def attention_backward(q, k, v, o, lse, do, causal, q_offset, TQ, TK):
    """Backward of attention_forward: do (B, Tq, NH, D) -> the fused gradient (B, T, 3, NH, D) =
    (dQ, dK, dV) side by side, which reshapes to (B, T, 3C) like qkv. In the forward pass
    O = P V with P = softmax(S), so:

        dV = P^T dO,   dP = dO V^T,   dS = P * (dP - rowsum(dO * O)),   dQ = dS K / sqrt(D),
        dK = dS^T Q / sqrt(D)
    (rowsum(dO * O) = rowsum(dP * P), the softmax Jacobian's diagonal term). P is rebuilt tile by
    tile from the saved lse; for each key tile, dK and dV are summed over the query tiles that see it.
    A tile on the causal diagonal goes in two halves of its rows, the first against the keys it sees
    (at most half of them), which skips the masked quarter. Needs Tq = Tk (training, q_offset = 0
    unless testing). TQ, TK: the tile (tiles()).
    """
    B, Tq, NH, D = q.shape
    Tk = k.shape[1]
    dqkv = np.empty((B, Tq, 3, NH, D), dtype=q.dtype)                 # each head zeroes its own rows
    for bh in prange(B * NH):
        b, h = bh // NH, bh % NH
        delta = np.empty(Tq, dtype=q.dtype)                        # rowsum(dO * O)
        for i in range(Tq):
            s = 0.0
            for d in range(D):
                s += np.float64(do[b, i, h, d]) * o[b, i, h, d]
            delta[i] = s
        P_buf, dS_buf = np.empty(TQ * TK, dtype=q.dtype), np.empty(TQ * TK, dtype=q.dtype)
        KT_buf, VT_buf = np.empty(D * TK, dtype=q.dtype), np.empty(D * TK, dtype=q.dtype)
        Qh, Kh, Vh, dOh = q[b, :, h], k[b, :, h], v[b, :, h], do[b, :, h]     # (T, D) views, read in place
        dQh, dKh, dVh = dqkv[b, :, 0, h], dqkv[b, :, 1, h], dqkv[b, :, 2, h]  # summed into in place
        for i in range(Tq):
            dQh[i], dKh[i], dVh[i] = 0.0, 0.0, 0.0
        for j0 in range(0, Tk, TK):
            bk = min(j0 + TK, Tk) - j0
            KTj, VTj = KT_buf[:D * bk].reshape(D, bk), VT_buf[:D * bk].reshape(D, bk)  # K_j^T, V_j^T
            _transpose(Kh[j0:j0 + bk], KTj)
            _transpose(Vh[j0:j0 + bk], VTj)
            i_first = max(0, j0 - q_offset) if causal else 0       # earlier queries never see tile j
            for i0 in range(i_first - i_first % TQ, Tq, TQ):
                i1 = min(i0 + TQ, Tq)
                r0, mid = i0, (i0 + i1) // 2
                k_mid = _visible(0, mid - 1, j0, bk, causal, q_offset)   # keys row mid - 1 sees
                if i0 < mid and k_mid <= bk // 2:                  # on the diagonal: split the rows
                    if k_mid > 0:
                        _backward_block(Qh, Kh, KTj, VTj, dOh, lse[b, h], delta, i0, mid, j0, k_mid, causal, q_offset,
                                        dQh, dKh, dVh, P_buf, dS_buf)
                    r0 = mid
                _backward_block(Qh, Kh, KTj, VTj, dOh, lse[b, h], delta, r0, i1, j0,
                                _visible(0, i1 - 1, j0, bk, causal, q_offset), causal, q_offset,
                                dQh, dKh, dVh, P_buf, dS_buf)
    return dqkv


@njit(**_JIT)
def _backward_block(Qh, Kh, KTj, VTj, dOh, lse_h, delta, r0, r1, j0, kb, causal, q_offset, dQh, dKh, dVh,
                    P_buf, dS_buf):
    """attention_backward for query rows r0 .. r1 - 1 of one head against its keys j0 .. j0 + kb - 1,
    every key any of these rows sees: P, dS (bq, kb) in the scratch buffers, then
    dV_j += P^T dO_i,  dQ_i += dS K_j,  dK_j += dS^T Q_i.
    KTj, VTj: K_j^T and V_j^T as contiguous (D, >= kb) copies, made once per key tile, so that S and
    dP are products of untransposed operands: at these sizes OpenBLAS runs those without packing on
    AVX-512 cores, and not a product whose right operand it must transpose (measured on an Intel Xeon,
    one thread: 128 x 128 x 32 in 6.5 us against 10.7; the backward 0.89-0.91 of the time at D = 32
    with 2 threads, level at D = 64)."""
    bq = r1 - r0
    scale = Qh.dtype.type(1.0 / np.sqrt(Qh.shape[1]))
    Qi, dOi, Kj = Qh[r0:r1], dOh[r0:r1], Kh[j0:j0 + kb]            # (bq, D), (kb, D)
    P = P_buf[:bq * kb].reshape(bq, kb)
    gemm(Qi, KTj[:, :kb], P, False, False, 0.0)                    # S, then P in place
    _probabilities(P, lse_h[r0:r1], scale, r0, j0, causal, q_offset)  # P = exp(S * scale - lse)
    gemm(P, dOi, dVh[j0:j0 + kb], True, False, 1.0)                # dV_j += P^T dO_i
    dS = dS_buf[:bq * kb].reshape(bq, kb)
    gemm(dOi, VTj[:, :kb], dS, False, False, 0.0)                  # dP, then dS in place
    for a in range(bq):
        delta_a = delta[r0 + a]
        for c in range(kb):
            dS[a, c] = P[a, c] * (dS[a, c] - delta_a) * scale
    gemm(dS, Kj, dQh[r0:r1], False, False, 1.0)                    # dQ_i += dS K_j
    gemm(dS, Qi, dKh[j0:j0 + kb], True, False, 1.0)                # dK_j += dS^T Q_i


@njit(**_JIT)
def _probabilities(P, lse, scale, r0, j0, causal, q_offset):
    """P (bq, kb) holding S_ij for rows r0 + a, keys j0 + c -> P_ij = exp(S_ij * scale - lse_i) for
    the keys each row sees, 0 for the others. A function of its own, called per block: with its rows'
    loop written out in _backward_block, the same code ran slower (measured on an Intel Xeon, 2
    threads, micro's shape: the backward 1.03-1.05x the time of the one before the one-pass softmax,
    against 0.95-0.96x with this function)."""
    bq, kb = P.shape
    for a in range(bq):
        nb = _visible(a, r0, j0, kb, causal, q_offset)
        exp_shifted(P[a], nb, scale, lse[a])
        P[a, nb:] = 0.0


def attention_backward_ref(q, k, v, o, lse, do, causal, q_offset):
    P, _ = _attention_probs_ref(q, k, causal, q_offset)
    scale = 1.0 / np.sqrt(q.shape[-1])
    q, k, v, o, do = (_per_head(x) for x in (q, k, v, o, do))                # (B, NH, T, D)
    dv = np.swapaxes(P, -1, -2) @ do
    dP = do @ np.swapaxes(v, -1, -2)
    dS = P * (dP - np.sum(do * o, axis=-1, keepdims=True)) * scale
    dq, dk = dS @ k, np.swapaxes(dS, -1, -2) @ q
    return np.stack([_per_head(d) for d in (dq, dk, dv)], axis=2).astype(q.dtype)  # (B, T, 3, NH, D)
