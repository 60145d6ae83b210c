"""Every numba kernel against its NumPy *_ref twin, float32 and float64, on awkward shapes."""
import numpy as np
import pytest

from minigpt_img import attention, decode_kernels, exp_kernels, kernels, palette_kernels
from minigpt_img.threads import kernels_on_this_thread

ROWS_COLS = [(1, 1), (1, 7), (3, 1), (5, 33), (130, 64)]  # single row/col, odd widths, > chunk count
DTYPES = [np.float32, np.float64]


def tol(dtype):
    return dict(rtol=2e-5, atol=2e-5) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,C", ROWS_COLS)
def test_norm(N, C, dtype):
    rng = np.random.default_rng(N * 100 + C)
    x = (rng.standard_normal((N, C)) * 3).astype(dtype)
    g = rng.standard_normal(C).astype(dtype)
    dy = rng.standard_normal((N, C)).astype(dtype)
    y, rstd = kernels.norm_forward(x, g, 1e-5)
    y_ref, rstd_ref = kernels.norm_forward_ref(x, g, 1e-5)
    assert y.dtype == dtype and rstd.dtype == dtype
    np.testing.assert_allclose(y, y_ref, **tol(dtype))
    np.testing.assert_allclose(rstd, rstd_ref, **tol(dtype))
    dx, dg = kernels.norm_backward(dy, x, g, rstd)
    dx_ref, dg_ref = kernels.norm_backward_ref(dy, x, g, rstd)
    assert dx.dtype == dtype and dg.dtype == dtype
    np.testing.assert_allclose(dx, dx_ref, **tol(dtype))
    np.testing.assert_allclose(dg, dg_ref, **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,K,N", [(1, 1, 1), (1, 5, 7), (3, 8, 1), (8, 33, 64), (4, 512, 130), (2, 11, 3), (13, 6, 17)])
def test_few_rows_matmul(M, K, N, dtype):
    """Against its twin, with K below, above and not a multiple of the row blocks; the same sums on 1
    and 2 threads."""
    rng = np.random.default_rng(M * 1000 + K * 10 + N)
    x, W = rng.standard_normal((M, K)).astype(dtype), rng.standard_normal((K, N)).astype(dtype)
    out = decode_kernels.few_rows_matmul(x, W)
    assert out.dtype == dtype and out.shape == (M, N)
    np.testing.assert_allclose(out, decode_kernels.few_rows_matmul_ref(x, W), **tol(dtype))
    with kernels_on_this_thread():
        assert np.array_equal(out, decode_kernels.few_rows_matmul(x, W))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,C,H", [(1, 1, 4), (3, 5, 20), (8, 33, 132), (4, 64, 256), (13, 16, 2050)])
@pytest.mark.parametrize("bias", [False, True])
def test_few_rows_mlp(M, C, H, bias, dtype):
    """Against its twin, with 1, 2 and 16 blocks of hidden units, H not a multiple of them; the same
    sums on 1 and 2 threads."""
    rng = np.random.default_rng(M * 1000 + C * 10 + H)
    x = rng.standard_normal((M, C)).astype(dtype)
    W_fc, W_proj = (rng.standard_normal(s).astype(dtype) / np.sqrt(s[0]) for s in ((C, H), (H, C)))
    b_fc, b_proj = (rng.standard_normal(n).astype(dtype) if bias else None for n in (H, C))
    y = decode_kernels.few_rows_mlp(x, W_fc, b_fc, W_proj, b_proj)
    assert y.dtype == dtype and y.shape == (M, C)
    np.testing.assert_allclose(y, decode_kernels.few_rows_mlp_ref(x, W_fc, b_fc, W_proj, b_proj), **tol(dtype))
    with kernels_on_this_thread():
        assert np.array_equal(y, decode_kernels.few_rows_mlp(x, W_fc, b_fc, W_proj, b_proj))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 2, 17, 1000])
def test_gelu2(n, dtype):
    rng = np.random.default_rng(n)
    x = (rng.standard_normal(n) * 4).astype(dtype)
    x[0] = -200.0  # exp overflow side: must give 0, not NaN
    dy = rng.standard_normal(n).astype(dtype)
    np.testing.assert_allclose(kernels.gelu2_forward(x), kernels.gelu2_forward_ref(x), **tol(dtype))
    np.testing.assert_allclose(kernels.gelu2_backward(dy, x), kernels.gelu2_backward_ref(dy, x),
                               **tol(dtype))
    assert np.all(np.isfinite(kernels.gelu2_backward(dy, x)))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,V", [(1, 1), (1, 5), (7, 3), (64, 513)])
def test_cross_entropy(N, V, dtype):
    rng = np.random.default_rng(N + V)
    z = (rng.standard_normal((N, V)) * 5).astype(dtype)
    z[0, 0] = 80.0  # large logit: log-sum-exp must not overflow
    t = rng.integers(0, V, N)
    loss, lse = kernels.xent_forward(z, t)
    loss_ref, lse_ref = kernels.xent_forward_ref(z, t)
    np.testing.assert_allclose(loss, loss_ref, **tol(dtype))
    np.testing.assert_allclose(lse, lse_ref, **tol(dtype))
    coef = rng.standard_normal(N)
    dz = kernels.xent_backward(z, t, lse, coef)
    assert dz.dtype == dtype
    np.testing.assert_allclose(dz, kernels.xent_backward_ref(z, t, lse, coef), **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,C,V", [(1, 1, 1), (6, 3, 2), (50, 9, 4)])
def test_embedding_backward_repeated_indices(N, C, V, dtype):
    rng = np.random.default_rng(N)
    idx = rng.integers(0, V, N)
    idx[:2] = 0  # at least one repeat when N > 1
    g = rng.standard_normal((N, C)).astype(dtype)
    dW = kernels.embedding_backward(idx, g, V)
    assert dW.dtype == dtype and dW.shape == (V, C)
    np.testing.assert_allclose(dW, kernels.embedding_backward_ref(idx, g, V), **tol(dtype))


THREAD_CHECK = """
import numba, numpy as np
from minigpt_img import kernels
rng = np.random.default_rng(0)
x, dy = rng.standard_normal((2, 300, 48)).astype(np.float32)
g = rng.standard_normal(48).astype(np.float32)
_, rstd = kernels.norm_forward(x, g, 1e-5)
results = []
for n in (1, 2, 3, 4):
    numba.set_num_threads(n)
    results.append(kernels.norm_backward(dy, x, g, rstd))
same = all(np.array_equal(dx, results[0][0]) and np.array_equal(dg, results[0][1]) for dx, dg in results)
print(numba.get_num_threads(), same)
"""


def test_norm_backward_does_not_depend_on_thread_count():
    """Row chunks are fixed, so the weight gradient is bit-identical whatever the thread count. Run
    with 1 to 4 numba threads in a fresh process (the pool's size is fixed when numba starts, and
    this process may have been given one thread)."""
    import os
    import subprocess
    import sys
    env = {**os.environ, "NUMBA_NUM_THREADS": "4"}
    r = subprocess.run([sys.executable, "-c", THREAD_CHECK], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["4", "True"]


ATTN_SHAPES = [  # (B, NH, T, D): T = 1, T not a multiple of the tile, head sizes 8/32/64/128, one head
    (1, 1, 1, 8), (1, 1, 1, 64), (1, 3, 65, 32), (2, 1, 130, 64), (1, 1, 100, 8), (2, 2, 64, 32),
    (2, 1, 7, 32), (1, 1, 70, 128),  # a head size whose one-thread key tile is 32 wide
    (3, 2, 33, 16),
]


@pytest.mark.parametrize("tiles", ["one-thread", (128, 128), (16, 8), (64, attention.FORWARD_KEYS)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("B,NH,T,D", ATTN_SHAPES)
def test_attention_forward_and_backward(B, NH, T, D, causal, dtype, tiles):
    """On the strided views of a fused qkv (B, T, 3C), as the model calls it; with the tiles of a
    BLAS that may start threads, the tiles of one that may not, small ones (many per head), and the
    forward's (every key in one tile)."""
    tiles = attention.one_thread_tiles(D) if tiles == "one-thread" else tiles
    rng = np.random.default_rng(B * 10000 + NH * 1000 + T + D)
    qkv = rng.standard_normal((B, T, 3 * NH * D)).astype(dtype)
    q, k, v = attention.heads(qkv, NH)                                          # (B, T, NH, D) views
    do = rng.standard_normal((B, T, NH, D)).astype(dtype)
    o, lse = attention.attention_forward(q, k, v, causal, 0, *tiles)
    o_ref, lse_ref = attention.attention_forward_ref(q, k, v, causal, 0)
    assert o.dtype == dtype and lse.dtype == dtype and o.flags.c_contiguous
    t = dict(rtol=1e-4, atol=1e-5) if dtype == np.float32 else dict(rtol=1e-11, atol=1e-12)
    np.testing.assert_allclose(o, o_ref, **t)
    np.testing.assert_allclose(lse, lse_ref, **t)
    dqkv = attention.attention_backward(q, k, v, o, lse, do, causal, 0, *tiles)
    assert dqkv.dtype == dtype and dqkv.shape == (B, T, 3, NH, D)
    np.testing.assert_allclose(dqkv, attention.attention_backward_ref(q, k, v, o_ref, lse_ref, do, causal, 0), **t)


@pytest.mark.parametrize("n", [1, 15, 16, 17, 40, 130])
def test_transpose_of_a_heads_rows(n):
    """attention._transpose: one head's rows of a fused qkv (any pitch) into a contiguous (D, n)."""
    qkv = np.random.default_rng(n).standard_normal((n, 3, 2, 32)).astype(np.float32)
    out = np.full((32, n), np.nan, dtype=np.float32)
    attention._transpose(qkv[:, 1, 1], out)
    np.testing.assert_array_equal(out, qkv[:, 1, 1].T)


@pytest.mark.parametrize("q_offset,Tq,Tk", [(0, 1, 1), (9, 1, 10), (70, 5, 75), (3, 64, 67)])
def test_attention_with_offset_matches_reference(q_offset, Tq, Tk):
    """Queries placed after q_offset cached positions (incremental decoding); keys beyond the last
    query's position may hold garbage and must never be read."""
    rng = np.random.default_rng(q_offset)
    q = rng.standard_normal((1, Tq, 3, 16))
    k, v = rng.standard_normal((2, 1, Tk + 20, 3, 16))
    k[:, Tk:] = np.nan  # unwritten cache slots
    v[:, Tk:] = np.nan
    o, lse = attention.attention_forward(q, k, v, True, q_offset, *attention.tiles(16))
    o_ref, lse_ref = attention.attention_forward_ref(q, k[:, :Tk], v[:, :Tk], True, q_offset)
    np.testing.assert_allclose(o, o_ref, rtol=1e-11, atol=1e-12)
    np.testing.assert_allclose(lse, lse_ref, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,NH,D,q_offset,Tq", [(1, 1, 8, 0, 1), (2, 3, 16, 9, 1), (1, 2, 32, 70, 5),
                                                (3, 1, 64, 0, 8), (1, 1, 7, 127, 1)])
def test_attention_decode_matches_reference(B, NH, D, q_offset, Tq, dtype):
    """A few queries against the head-major cache (B, NH, n_ctx, D); the slots not yet written hold
    NaN and must never be read."""
    rng = np.random.default_rng(q_offset * 10 + D)
    Tk, n_ctx = q_offset + Tq, q_offset + Tq + 20
    q = rng.standard_normal((B, Tq, NH, D)).astype(dtype)
    k, v = rng.standard_normal((2, B, NH, n_ctx, D)).astype(dtype)
    k[:, :, Tk:] = np.nan
    v[:, :, Tk:] = np.nan
    o = attention.attention_decode(q, k, v, q_offset)
    o_ref, _ = attention.attention_forward_ref(q, k[:, :, :Tk].transpose(0, 2, 1, 3),
                                               v[:, :, :Tk].transpose(0, 2, 1, 3), True, q_offset)
    assert o.dtype == dtype and o.flags.c_contiguous
    t = dict(rtol=1e-4, atol=1e-5) if dtype == np.float32 else dict(rtol=1e-11, atol=1e-12)
    np.testing.assert_allclose(o, o_ref, **t)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,NH,D,q_offset,Tq", [(1, 1, 8, 0, 1), (2, 3, 16, 9, 1), (1, 2, 7, 70, 5),
                                                (4, 2, 8, 0, 2), (1, 1, 7, 127, 1)])
@pytest.mark.parametrize("bias", [False, True])
def test_decode_layer_matches_reference(B, NH, D, q_offset, Tq, bias, dtype):
    """The attention sub-layer of a decoding step: the output and the cache it writes match the twin
    and do not depend on the thread count; the cache's slots past the new positions hold NaN and
    must be neither read nor written."""
    rng = np.random.default_rng(q_offset * 10 + D + Tq)
    C, n_ctx = NH * D, q_offset + Tq + 20
    x = rng.standard_normal((B, Tq, C)).astype(dtype)
    W_attn, W_proj = (rng.standard_normal(s).astype(dtype) / np.sqrt(C) for s in ((C, 3 * C), (C, C)))
    b_attn, b_proj = (rng.standard_normal(n).astype(dtype) if bias else None for n in (3 * C, C))
    k, v = rng.standard_normal((2, B, NH, n_ctx, D)).astype(dtype)
    k[:, :, q_offset:] = np.nan
    v[:, :, q_offset:] = np.nan
    k_ref, v_ref = k.copy(), v.copy()
    k_one, v_one = k.copy(), v.copy()
    y = attention.decode_layer(x, W_attn, b_attn, W_proj, b_proj, k, v, q_offset)
    with kernels_on_this_thread():                                           # the same sums on 1 thread
        assert np.array_equal(y, attention.decode_layer(x, W_attn, b_attn, W_proj, b_proj, k_one, v_one, q_offset))
    y_ref = attention.decode_layer_ref(x, W_attn, b_attn, W_proj, b_proj, k_ref, v_ref, q_offset)
    assert y.dtype == dtype and y.shape == (B, Tq, C)
    t = dict(rtol=1e-4, atol=1e-5) if dtype == np.float32 else dict(rtol=1e-11, atol=1e-12)
    np.testing.assert_allclose(y, y_ref, **t)
    np.testing.assert_allclose(k, k_ref, **t)                                # NaN where both are
    np.testing.assert_allclose(v, v_ref, **t)
    assert np.isnan(k[:, :, q_offset + Tq:]).all() and np.isfinite(k[:, :, :q_offset + Tq]).all()


@pytest.mark.parametrize("n,k", [(1, 1), (5, 3), (257, 64)])
def test_min_sq_dist_update(n, k):
    rng = np.random.default_rng(n)
    points = rng.uniform(-1, 1, (n, 3))
    d2, d2_ref = np.full(n, np.inf), np.full(n, np.inf)
    for c in rng.uniform(-1, 1, (k, 3)):
        palette_kernels.min_sq_dist_update(points, c, d2)
        palette_kernels.min_sq_dist_update_ref(points, c, d2_ref)
    np.testing.assert_allclose(d2, d2_ref, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("dtype", DTYPES)
def test_exp_shifted_over_the_exponents_range(dtype):
    """exp(z) for z from 0 down past the smallest normal result, within |z| ulps (+ a few) of the
    exact value; below the range, the smallest normal number; also after a fast-math kernel has
    compiled it (xent_forward runs first here)."""
    kernels.xent_forward(np.zeros((2, 3), dtype=dtype), np.zeros(2, dtype=np.int64))
    lowest = -87.0 if dtype == np.float32 else -708.0
    z = np.concatenate([np.linspace(lowest, 0.0, 100_003), [lowest - 10.0, -1e30]]).astype(dtype)
    got = z.copy()
    exp_kernels.exp_shifted(got, z.size, 1.0, 0.0)
    exact = np.exp(z.astype(np.float64))
    eps, tiny = np.finfo(dtype).eps, np.finfo(dtype).tiny
    inside = exact >= tiny
    assert np.all(np.abs(got[inside] - exact[inside]) <= eps * (4 + 2 * np.abs(z[inside])) * exact[inside])
    assert np.all(got[~inside] == tiny) and got[-1] == tiny


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 2, 7, 8, 9, 31, 32, 33, 257, 1000])
def test_exp_shifted_matches_its_twin(n, dtype):
    """exp(alpha z - shift) over row[:n] and its sum, against NumPy's in float64: within a few ulps
    of what the argument's rounding costs in the row's precision (ulps of |alpha z| + |shift|);
    row[n:] untouched; scores far below the maximum (beyond the exponent's range) come out tiny."""
    rng = np.random.default_rng(n)
    row = rng.uniform(-30, 30, n + 5).astype(dtype)
    row[n // 2] = -1000.0 if n > 2 else row[n // 2]                   # scaled: far below the maximum
    alpha = 0.7
    shift = alpha * float(row[:n].max())
    got, want = row.copy(), row.copy()
    total = exp_kernels.exp_shifted(got, n, alpha, shift)
    want_total = exp_kernels.exp_shifted_ref(want, n, alpha, shift)
    eps, tiny = np.finfo(dtype).eps, np.finfo(dtype).tiny
    size = np.abs(float(dtype(alpha)) * row[:n].astype(np.float64)) + abs(float(dtype(shift)))
    assert np.all(np.abs(got[:n] - want[:n]) <= eps * (8 + 2 * size) * want[:n] + tiny)
    np.testing.assert_allclose(total, want_total, rtol=4 * eps * (1 + np.log(n)))
    assert got.dtype == dtype
    np.testing.assert_array_equal(got[n:], row[n:])


@pytest.mark.parametrize("dtype", DTYPES)
def test_exp_shifted_keeps_nan(dtype):
    row = np.array([0.0, np.nan, -1.0, -np.inf], dtype=dtype)
    total = exp_kernels.exp_shifted(row, 4, 1.0, 0.0)
    assert np.isnan(row[1]) and np.isnan(total) and row[0] == 1.0 and 0 <= row[3] < 1.2e-38


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 2, 7, 8, 9, 15, 16, 17, 33, 513])
def test_row_max(n, dtype):
    row = np.random.default_rng(n).standard_normal(n + 3).astype(dtype)
    row[n:] = 1e9  # beyond n: must not be read
    assert kernels.row_max(row, n) == row[:n].max()


@pytest.mark.parametrize("n", [8, 13, 24])
def test_row_max_finds_the_maximum_at_every_column(n):
    """row_max keeps a running maximum per column mod 8 plus the tail: the maximum in any of them."""
    for at in range(n):
        row = -np.arange(n, dtype=np.float32) - 1.0
        row[at] = 5.0
        assert kernels.row_max(row, n) == 5.0


def _rows_in_wider_array(x, rng, pad=5):
    """x copied into the left columns of a wider array: the same values, rows spaced by a pitch."""
    wide = rng.standard_normal((x.shape[0], x.shape[1] + pad)).astype(x.dtype)
    wide[:, :x.shape[1]] = x
    return wide[:, :x.shape[1]]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,K,N", [(1, 1, 1), (1, 7, 3), (5, 1, 4), (3, 5, 1), (33, 17, 65), (128, 32, 128)])
@pytest.mark.parametrize("trans_a,trans_b", [(False, False), (False, True), (True, False), (True, True)])
@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_gemm(M, K, N, trans_a, trans_b, beta, dtype):
    """c = op(a) op(b) + beta c on views whose rows are spaced by a pitch, as the attention tiles use
    it; what c held is ignored at beta = 0 (NaN included), and c's pitch padding is left alone."""
    rng = np.random.default_rng(M * 10_000 + K * 100 + N)
    a = _rows_in_wider_array(rng.standard_normal((K, M) if trans_a else (M, K)).astype(dtype), rng)
    b = _rows_in_wider_array(rng.standard_normal((N, K) if trans_b else (K, N)).astype(dtype), rng)
    wide = rng.standard_normal((M, N + 3)).astype(dtype)
    if beta == 0:
        wide[:, :N] = np.nan
    c, c_ref, padding = wide[:, :N], wide[:, :N].copy(), wide[:, N:].copy()
    kernels.gemm(a, b, c, trans_a, trans_b, beta)
    kernels.gemm_ref(a, b, c_ref, trans_a, trans_b, beta)
    np.testing.assert_allclose(c, c_ref, **tol(dtype))
    np.testing.assert_array_equal(wide[:, N:], padding)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,K,N", [(1, 1, 1), (1, 9, 5), (63, 7, 3), (64, 1, 65), (65, 33, 17), (129, 16, 31),
                                   (257, 40, 1)])
def test_rows_matmul(M, K, N, dtype):
    """Against its twin with fewer rows than a block, a block and a row more, odd widths."""
    rng = np.random.default_rng(M * 1000 + K * 10 + N)
    a, b = rng.standard_normal((M, K)).astype(dtype), rng.standard_normal((K, N)).astype(dtype)
    out = kernels.rows_matmul(a, b)
    assert out.dtype == dtype and out.shape == (M, N)
    np.testing.assert_allclose(out, kernels.rows_matmul_ref(a, b), **tol(dtype))


def test_rows_matmul_gives_each_row_the_same_sums_on_one_and_two_threads():
    """Blocks of rows of micro's c_attn product (256 rows of width 128 -> 384): BLAS's blocked
    kernels sum every row alike whatever the block, so the split changes no bit."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((256, 128)).astype(np.float32)
    b = rng.standard_normal((128, 384)).astype(np.float32)
    out = kernels.rows_matmul(a, b)
    with kernels_on_this_thread():
        assert np.array_equal(out, kernels.rows_matmul(a, b))


@pytest.mark.parametrize("a_shape,b_shape,c_shape", [((4, 3), (2, 5), (4, 5)), ((4, 3), (3, 5), (4, 6)),
                                                     ((4, 3), (3, 5), (2, 5))])
def test_gemm_refuses_operands_that_do_not_match(a_shape, b_shape, c_shape):
    """A mismatch would have BLAS read or write past an array: refused, c untouched."""
    c = np.full(c_shape, 7.0)
    with pytest.raises(ValueError):
        kernels.gemm(np.ones(a_shape), np.ones(b_shape), c, False, False, 0.0)
    assert np.all(c == 7.0)


def test_gemm_refuses_rows_that_are_not_contiguous():
    a = np.ones((4, 6))
    with pytest.raises(ValueError, match="contiguous"):
        kernels.gemm(a[:, ::2], np.ones((3, 2)), np.zeros((4, 2)), False, False, 0.0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", [1, 63, 65, 1001])
@pytest.mark.parametrize("decay", [0.0, 0.1])
@pytest.mark.parametrize("parallel_size", [1, 10**9])
def test_adam_update_matches_its_twin_to_the_bit(dtype, n, decay, parallel_size, monkeypatch):
    """On numba's threads (every size from parallel_size = 1) and on the calling thread."""
    from minigpt_img import optim
    from minigpt_img.optim import adam_update, adam_update_ref
    monkeypatch.setattr(optim, "PARALLEL_SIZE", parallel_size)
    rng = np.random.default_rng(n)
    p, g, m = (rng.standard_normal(n).astype(dtype) for _ in range(3))
    v = rng.random(n).astype(dtype)
    f = np.dtype(dtype).type
    scalars = (f(0.7), f(0.9), f(0.1), f(0.95), f(0.05), f(3e-3 / 0.271), f(0.143), f(1e-8), f(3e-3 * decay))
    mine, ref = [a.copy() for a in (p, g, m, v)], [a.copy() for a in (p, g, m, v)]
    assert adam_update(*mine, *scalars) and adam_update_ref(*ref, *scalars)
    for a, b in zip(mine, ref):
        np.testing.assert_array_equal(a, b)
    g[n // 2] = np.inf  # a gradient that overflowed makes a weight non-finite: reported
    assert not adam_update(p.copy(), g, m.copy(), v.copy(), *scalars)
