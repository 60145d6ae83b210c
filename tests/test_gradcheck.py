"""Every differentiable op's analytic backward against float64 central differences.

Each case is (name, function of Tensors, input arrays). The upstream gradient is random; shapes
broadcast; some inputs are non-contiguous (transposed) views. A last test fails if any Function in
ops.py is not exercised by some case here.
"""
import inspect

import numpy as np
import pytest

from minigpt_img import nn, ops
from minigpt_img.tensor import Function, Tensor

from helpers import gradcheck, gradcheck_params

R = np.random.default_rng(1234)


def randn(*shape):
    return R.standard_normal(shape)


def positive(*shape):
    return R.uniform(0.5, 2.0, shape)


def transposed(*shape):
    """A non-contiguous view: the transpose of a (reversed-shape) array."""
    a = R.standard_normal(shape[::-1]).T
    assert not a.flags.c_contiguous
    return a


def away_from_zero(*shape):
    """Values with |x| >= 0.1, so relu and max have no kink within the finite-difference step."""
    return R.choice([-1.0, 1.0], size=shape) * R.uniform(0.1, 2.0, shape)


IDX = np.array([[0, 3, 3], [1, 0, 3]])  # repeated indices for the gather

CASES = [
    ("add_broadcast", lambda a, b: a + b, [randn(3, 1, 4), randn(2, 1)]),
    ("sub_broadcast", lambda a, b: a - b, [randn(4), randn(2, 3, 4)]),
    ("mul_broadcast", lambda a, b: a * b, [randn(2, 3, 4), randn(1, 4)]),
    ("div_broadcast", lambda a, b: a / b, [randn(3, 4), positive(3, 1)]),
    ("neg", lambda a: -a, [randn(2, 3)]),
    ("pow_2", lambda a: a ** 2, [randn(2, 3)]),
    ("pow_fractional", lambda a: a ** -1.5, [positive(5)]),
    ("matmul_2d_transposed", lambda a, b: a @ b, [transposed(3, 4), randn(4, 5)]),
    ("matmul_batched_weight", lambda a, b: a @ b, [randn(2, 3, 4), transposed(4, 2)]),
    ("matmul_broadcast_batch", lambda a, b: a @ b, [randn(2, 1, 3, 4), randn(3, 4, 2)]),
    ("sum_all", lambda a: a.sum(), [randn(3, 4)]),
    ("sum_axis", lambda a: a.sum(axis=1), [randn(2, 3, 4)]),
    ("sum_axes_keepdims", lambda a: a.sum(axis=(0, 2), keepdims=True), [randn(2, 3, 4)]),
    ("mean_axis_neg", lambda a: a.mean(axis=-1), [transposed(3, 4)]),
    ("mean_all_keepdims", lambda a: a.mean(keepdims=True), [randn(2, 3)]),
    ("max_axis", lambda a: a.max(axis=1), [randn(3, 5)]),
    ("max_all", lambda a: a.max(), [randn(4, 3)]),
    ("max_keepdims", lambda a: a.max(axis=0, keepdims=True), [randn(4, 3)]),
    ("reshape", lambda a: (a.reshape(6, 2) * Tensor(np.arange(12.0).reshape(6, 2))), [transposed(3, 4)]),
    ("transpose", lambda a: a.T @ Tensor(np.ones((3, 2))), [randn(3, 4)]),
    ("permute", lambda a: ops.permute(a, 2, 0, 1), [randn(2, 3, 4)]),
    ("slice_basic", lambda a: a[1:, ::2], [randn(3, 5)]),
    ("slice_int_ellipsis", lambda a: a[..., 1] * a[0], [randn(3, 3)]),
    ("index_repeated", lambda a: a[np.array([0, 2, 2, 0])], [randn(3, 2)]),
    ("concat", lambda a, b: ops.concat([a, b, a], axis=1), [randn(2, 3), randn(2, 1)]),
    ("stack", lambda a, b: ops.stack([a, b], axis=1), [randn(2, 3), transposed(2, 3)]),
    ("embedding_repeated", lambda w: ops.embedding(w, IDX), [randn(5, 3)]),
    ("exp", ops.exp, [randn(2, 3)]),
    ("log", ops.log, [positive(2, 3)]),
    ("sigmoid", ops.sigmoid, [randn(2, 3) * 3]),
    ("tanh", ops.tanh, [randn(2, 3)]),
    ("relu", ops.relu, [away_from_zero(3, 4)]),
    ("norm", lambda x, g: ops.norm(x, g), [randn(2, 3, 7), randn(7)]),
    ("norm_one_row_strided", lambda x, g: ops.norm(x, g), [randn(1, 10)[:, ::2], randn(5)]),
    ("gelu2", ops.gelu2, [randn(3, 5) * 2]),
    ("gelu2_transposed", ops.gelu2, [transposed(4, 3)]),
    ("softmax", lambda x: ops.softmax(x, axis=-1), [randn(2, 3, 5)]),
    ("softmax_axis0", lambda x: ops.softmax(x, axis=0), [randn(4, 3)]),
    ("log_softmax", lambda x: ops.log_softmax(x), [randn(3, 6)]),
    ("cross_entropy_mean", lambda z: ops.cross_entropy(z, np.array([[1, 0, 4], [2, 2, 3]])),
     [randn(2, 3, 5)]),
    ("cross_entropy_weighted", lambda z: ops.cross_entropy(z, np.array([1, 0, 4, 3]),
                                                           weights=np.array([1.0, 0.0, 1.0, 2.0])),
     [randn(4, 5)]),
    ("attention_causal", lambda qkv: ops.attention(qkv, n_head=2, causal=True), [randn(2, 5, 12)]),
    ("attention_bidirectional", lambda qkv: ops.attention(qkv, n_head=3, causal=False),
     [randn(1, 4, 18)]),
    ("attention_one_token", lambda qkv: ops.attention(qkv, n_head=1), [randn(2, 1, 6)]),
    # T = 130 with D = 4: the backward's two query tiles and two key tiles (128, 2) with 128 x 128
    # tiles, three query tiles (64, 64, 2) with the one-thread tiles, whose forward also has two key
    # tiles, so dK/dV summed over query tiles and (with one-thread tiles) the online softmax's
    # rescaling across key tiles are checked; test_kernels checks the rescaling with every BLAS
    ("attention_causal_many_tiles", lambda qkv: ops.attention(qkv, n_head=2, causal=True),
     [randn(1, 130, 24)]),
    ("attention_bidirectional_many_tiles", lambda qkv: ops.attention(qkv, n_head=2, causal=False),
     [randn(1, 130, 24)]),
    ("diamond", lambda x: (x + x) * x, [randn(3, 2)]),
]


@pytest.mark.parametrize("name,fn,arrays", CASES, ids=[c[0] for c in CASES])
def test_op_gradient(name, fn, arrays):
    gradcheck(fn, [a.copy() if a.flags.c_contiguous else a for a in arrays])


def test_diamond_accumulates_both_paths():
    x = Tensor(np.array([1.0, -2.0, 3.0]), requires_grad=True)
    ((x + x) * x).backward(np.ones(3))
    np.testing.assert_allclose(x.grad, 4 * x.data)  # d/dx 2x^2 = 4x


def test_every_function_in_ops_has_a_gradient_check():
    functions = {cls for _, cls in inspect.getmembers(ops, inspect.isclass)
                 if issubclass(cls, Function) and cls is not Function and cls.__module__ == ops.__name__}
    covered = set()
    for _, fn, arrays in CASES:
        out = fn(*[Tensor(a, requires_grad=True) for a in arrays])
        stack = [out]
        while stack:
            t = stack.pop()
            if t._ctx is not None:
                covered.add(type(t._ctx))
                stack.extend(t._ctx.inputs)
    missing = sorted(cls.__name__ for cls in functions - covered)
    assert not missing, f"Functions without a gradient check: {missing}"


def test_tiny_composite_end_to_end():
    """Two Linear layers + iGPT norm + gelu2 + cross-entropy, every parameter checked in float64
    through the modules themselves."""
    rng = np.random.default_rng(0)
    fc1 = nn.Linear(6, 8, rng, std=0.5, bias=True, dtype=np.float64)
    norm = nn.Norm(8, dtype=np.float64)
    fc2 = nn.Linear(8, 5, rng, std=0.5, bias=True, dtype=np.float64)
    norm.weight.data = rng.uniform(0.5, 1.5, 8)       # away from the trivial init
    fc1.bias.data = rng.standard_normal(8) * 0.1
    x = Tensor(rng.standard_normal((2, 3, 6)))
    targets = np.array([[0, 4, 2], [1, 1, 3]])

    def loss():
        return ops.cross_entropy(fc2(ops.gelu2(norm(fc1(x)))), targets)

    params = fc1.parameters() + norm.parameters() + fc2.parameters()
    assert len(params) == 5
    gradcheck_params(loss, params)
