"""Engine semantics: dtypes, accumulation, no_grad, detach, deep graphs, error messages."""
import numpy as np
import pytest

from minigpt_img import Tensor, no_grad, ops


def test_dtypes():
    assert Tensor([1, 2, 3]).dtype == np.float32            # ints become float32
    assert Tensor(np.zeros(2)).dtype == np.float64          # float64 is kept
    a = Tensor(np.ones(3, np.float32), requires_grad=True)
    out = (a * 2.0 + 1.0).sum()
    assert out.dtype == np.float32                          # Python scalars do not promote
    out.backward()
    assert a.grad.dtype == np.float32


def test_gradients_accumulate_across_backward_calls():
    w = Tensor(np.array([1.0, 2.0]), requires_grad=True)
    (w * 3.0).sum().backward()
    (w * w).sum().backward()
    np.testing.assert_allclose(w.grad, 3.0 + 2 * w.data)
    w.zero_grad()
    assert w.grad is None


def test_upstream_gradient_is_never_modified():
    x = Tensor(np.ones(3), requires_grad=True)
    g = np.array([1.0, 2.0, 3.0])
    (x + x + x).backward(g)
    np.testing.assert_array_equal(g, [1.0, 2.0, 3.0])
    np.testing.assert_allclose(x.grad, 3 * g)


def test_leaf_grad_does_not_alias_other_gradients():
    a = Tensor(np.ones(2), requires_grad=True)
    b = Tensor(np.ones(2), requires_grad=True)
    (a + b).backward(np.ones(2))
    a.grad += 10
    np.testing.assert_array_equal(b.grad, [1.0, 1.0])


def test_no_grad_and_detach():
    x = Tensor(np.ones(2), requires_grad=True)
    with no_grad():
        y = x * 2
    assert not y.requires_grad and y._ctx is None
    z = (x * 2).detach()
    assert not z.requires_grad
    assert (x * 2).requires_grad  # recording is back on after the block


def test_constants_get_no_gradient():
    x = Tensor(np.ones(2), requires_grad=True)
    c = Tensor(np.full(2, 5.0))
    (x * c).sum().backward()
    assert c.grad is None
    np.testing.assert_allclose(x.grad, 5.0)


def test_deep_graph_does_not_hit_recursion_limit():
    x = Tensor(np.array(1.0), requires_grad=True)
    y = x
    for _ in range(5000):
        y = y * 1.0 + 0.0
    y.backward()
    assert x.grad == pytest.approx(1.0)


def test_backward_errors():
    x = Tensor(np.ones(3), requires_grad=True)
    with pytest.raises(ValueError, match="scalar"):
        (x * 2).backward()
    with pytest.raises(ValueError, match="shape"):
        (x * 2).backward(np.ones(4))


def test_cross_entropy_checks_targets_and_weights():
    z = Tensor(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="targets"):
        ops.cross_entropy(z, np.array([0, 3]))
    with pytest.raises(ValueError, match="weights"):
        ops.cross_entropy(z, np.array([0, 1]), weights=np.zeros(2))
    # uniform logits: loss = log V, and weights pick positions
    assert ops.cross_entropy(z, np.array([0, 1])).item() == pytest.approx(np.log(3))


def test_cross_entropy_weights_count_only_weighted_positions():
    rng = np.random.default_rng(0)
    z = rng.standard_normal((4, 5))
    t = np.array([0, 1, 2, 3])
    w = np.array([1.0, 0.0, 1.0, 0.0])
    full = ops.cross_entropy(Tensor(z[[0, 2]]), t[[0, 2]]).item()
    assert ops.cross_entropy(Tensor(z), t, weights=w).item() == pytest.approx(full, rel=1e-12)


def test_tensor_conveniences():
    a = Tensor(np.arange(6.0).reshape(2, 3))
    assert a.T.shape == (3, 2) and a.shape == (2, 3) and a.ndim == 2 and len(a) == 2
    assert a.reshape(3, 2).shape == (3, 2) and a.reshape((6,)).shape == (6,)
    assert a.transpose(1, 0).shape == (3, 2)
    assert isinstance(a.numpy(), np.ndarray)
    np.testing.assert_allclose((np.ones(3) * Tensor(np.full(3, 2.0))).data, 2.0)  # ndarray * Tensor
