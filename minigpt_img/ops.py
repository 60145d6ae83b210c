"""Every differentiable operation: forward and backward side by side.

Each op is a Function (tensor.py) whose docstring gives its local derivative. In `backward`, `g` is the
upstream gradient dL/d(out) and the method returns dL/d(input) for each Tensor input. Inputs that were
broadcast in the forward pass get their gradient summed back to their own shape (`_unbroadcast`).
The fused ops (iGPT norm, gelu2, softmax cross-entropy, embedding backward, attention) call numba
kernels (kernels.py; attention in attention.py), one pass over the data each. The lower-case
functions at the end are the public API.

The model (model.py, finetune.py) uses add, mul, matmul, mean, embedding, norm, gelu2, attention and
cross_entropy. The others (sub, div, neg, pow, sum, max, reshape, transpose, permute, getitem, concat,
stack, exp, log, sigmoid, tanh, relu, softmax, log_softmax) are the engine's general vocabulary, there
for readers who build their own models with it; each is gradient-checked like the rest.

Dimension legend: B batch, T = n_px^2 tokens, C width, V palette, NH heads.
"""
from __future__ import annotations

import numpy as np

from . import attention as attention_kernels
from . import decode_kernels, kernels
from .tensor import Function, recording

_FLOATS = (np.float32, np.float64)


def _unbroadcast(g: np.ndarray, shape: tuple) -> np.ndarray:
    """Sum g over the axes that broadcasting added or stretched, so it has `shape` again."""
    if g.shape == shape:
        return g
    extra = g.ndim - len(shape)
    if extra:
        g = g.sum(axis=tuple(range(extra)))
    stretched = tuple(i for i, n in enumerate(shape) if n == 1 and g.shape[i] != 1)
    if stretched:
        g = g.sum(axis=stretched, keepdims=True)
    return g


def _expand_reduced(g: np.ndarray, shape: tuple, axis, keepdims: bool) -> np.ndarray:
    """Undo a reduction's shape change: put back the reduced axes (size 1) and broadcast to shape."""
    if not keepdims and axis is not None:
        axes = (axis,) if np.isscalar(axis) else tuple(axis)
        g = np.expand_dims(g, tuple(a % len(shape) for a in axes))
    elif not keepdims:
        g = np.reshape(g, (1,) * len(shape))
    return np.broadcast_to(g, shape)


def _is_basic_index(index) -> bool:
    """True for NumPy basic indexing (ints, slices, None, Ellipsis), which never repeats an element."""
    parts = index if isinstance(index, tuple) else (index,)
    return all(isinstance(p, (int, np.integer, slice)) or p is None or p is Ellipsis for p in parts)


def _rows(a: np.ndarray) -> np.ndarray:
    """View (..., C) as C-contiguous (N, C) for the kernels."""
    return np.ascontiguousarray(a.reshape(-1, a.shape[-1]))


# ---- elementwise arithmetic -----------------------------------------------------------------
class Add(Function):
    """out = a + b;  d/da = 1, d/db = 1."""

    def forward(self, a, b):
        self.shapes = a.shape, b.shape
        return a + b

    def backward(self, g):
        return _unbroadcast(g, self.shapes[0]), _unbroadcast(g, self.shapes[1])


class Sub(Function):
    """out = a - b;  d/da = 1, d/db = -1."""

    def forward(self, a, b):
        self.shapes = a.shape, b.shape
        return a - b

    def backward(self, g):
        return _unbroadcast(g, self.shapes[0]), _unbroadcast(-g, self.shapes[1])


class Mul(Function):
    """out = a * b;  d/da = b, d/db = a."""

    def forward(self, a, b):
        self.a, self.b = a, b
        return a * b

    def backward(self, g):
        ga = _unbroadcast(g * self.b, self.a.shape) if self.needs_grad(0) else None
        gb = _unbroadcast(g * self.a, self.b.shape) if self.needs_grad(1) else None
        return ga, gb


class Div(Function):
    """out = a / b;  d/da = 1 / b, d/db = -a / b^2."""

    def forward(self, a, b):
        self.a, self.b = a, b
        return a / b

    def backward(self, g):
        ga = _unbroadcast(g / self.b, self.a.shape) if self.needs_grad(0) else None
        gb = _unbroadcast(-g * self.a / (self.b * self.b), self.b.shape) if self.needs_grad(1) else None
        return ga, gb


class Neg(Function):
    """out = -a;  d/da = -1."""

    def forward(self, a):
        return -a

    def backward(self, g):
        return -g


class Pow(Function):
    """out = a ** p for a constant scalar p;  d/da = p * a ** (p - 1)."""

    def forward(self, a, p):
        self.a, self.p = a, p
        return a ** p

    def backward(self, g):
        return g * self.p * self.a ** (self.p - 1)


class MatMul(Function):
    """out = a @ b over the last two axes, leading (batch) axes broadcast.

    With out[..., i, j] = sum_k a[..., i, k] b[..., k, j]:  da = g @ b^T,  db = a^T @ g.
    When b is a 2-D weight shared by every batch row, db is one matmul over the flattened rows.
    The product of rows by a weight goes one of three ways: a few rows (a decoding step) stream the
    weight once (decode_kernels.few_rows_matmul); many rows outside the graph (no_grad: features,
    evaluation) blocks of rows on numba's threads (kernels.rows_matmul); the rest, training among
    them, NumPy's threaded BLAS (weight gradients a^T g split by rows or columns measured 1.1-1.8x
    slower).
    """

    def forward(self, a, b):
        self.a, self.b = a, b
        if b.ndim != 2:
            return a @ b
        rows = a.reshape(-1, a.shape[-1])                       # (rows, K): one product, not one per batch entry
        kernel_dtypes = a.dtype == b.dtype and b.dtype in _FLOATS
        if kernel_dtypes and len(rows) <= decode_kernels.FEW_ROWS and b.flags.c_contiguous:
            out = decode_kernels.few_rows_matmul(np.ascontiguousarray(rows), b)  # stream the weight once
        elif kernel_dtypes and not recording() and len(rows) >= kernels.MANY_ROWS and b.flags.c_contiguous:
            out = kernels.rows_matmul(np.ascontiguousarray(rows), b)    # inference: numba's threads only
        else:
            out = rows @ b
        return out.reshape(*a.shape[:-1], b.shape[1])

    def backward(self, g):
        a, b = self.a, self.b
        ga = gb = None
        if self.needs_grad(0):
            if b.ndim == 2 and g.ndim > 2:
                ga = (g.reshape(-1, g.shape[-1]) @ b.T).reshape(a.shape)
            else:
                ga = _unbroadcast(g @ np.swapaxes(b, -1, -2), a.shape)
        if self.needs_grad(1):
            if b.ndim == 2:  # (..., K) rows times (..., N) rows -> (K, N)
                gb = a.reshape(-1, a.shape[-1]).T @ g.reshape(-1, g.shape[-1])
            else:
                gb = _unbroadcast(np.swapaxes(a, -1, -2) @ g, b.shape)
        return ga, gb


# ---- reductions ----------------------------------------------------------------------------
class Sum(Function):
    """out = sum of a over axis;  d/da = 1 at every summed element."""

    def forward(self, a, axis=None, keepdims=False):
        self.shape, self.axis, self.keepdims = a.shape, axis, keepdims
        return np.sum(a, axis=axis, keepdims=keepdims)

    def backward(self, g):
        return _expand_reduced(g, self.shape, self.axis, self.keepdims)


class Mean(Function):
    """out = mean of a over axis;  d/da = 1 / (number of averaged elements)."""

    def forward(self, a, axis=None, keepdims=False):
        self.shape, self.axis, self.keepdims = a.shape, axis, keepdims
        out = np.mean(a, axis=axis, keepdims=keepdims)
        self.count = a.size // (np.size(out) or 1)
        return out

    def backward(self, g):
        return _expand_reduced(g / self.count, self.shape, self.axis, self.keepdims)


class Max(Function):
    """out = max of a over axis;  d/da = 1 at the maximum (shared equally between ties), else 0."""

    def forward(self, a, axis=None, keepdims=False):
        self.shape, self.axis, self.keepdims = a.shape, axis, keepdims
        out = np.max(a, axis=axis, keepdims=True)
        mask = a == out
        self.mask = mask / mask.sum(axis=axis, keepdims=True)
        return out if keepdims else np.max(a, axis=axis)

    def backward(self, g):
        return self.mask * _expand_reduced(g, self.shape, self.axis, self.keepdims)


# ---- shape ---------------------------------------------------------------------------------
class Reshape(Function):
    """out = a viewed with a new shape;  the gradient is reshaped back."""

    def forward(self, a, shape):
        self.shape = a.shape
        return a.reshape(shape)

    def backward(self, g):
        return g.reshape(self.shape)


class Transpose(Function):
    """out = a with axes permuted;  the gradient is permuted back by the inverse permutation."""

    def forward(self, a, axes=None):
        self.axes = tuple(range(a.ndim))[::-1] if axes is None else tuple(axes)
        return np.transpose(a, self.axes)

    def backward(self, g):
        return np.transpose(g, np.argsort(self.axes))


class GetItem(Function):
    """out = a[index];  the gradient lands at the selected places (added up where an integer-array
    index selects the same element twice), zero elsewhere."""

    def forward(self, a, index):
        self.shape, self.dtype, self.index = a.shape, a.dtype, index
        return a[index]

    def backward(self, g):
        ga = np.zeros(self.shape, dtype=self.dtype)
        if _is_basic_index(self.index):
            ga[self.index] = g  # slices select each element at most once
        else:
            np.add.at(ga, self.index, g)
        return ga


class Concat(Function):
    """out = concatenation of the inputs along axis;  each input gets its slice of the gradient."""

    def forward(self, *arrays, axis=0):
        self.axis = axis
        self.splits = np.cumsum([a.shape[axis] for a in arrays])[:-1]
        return np.concatenate(arrays, axis=axis)

    def backward(self, g):
        return tuple(np.split(g, self.splits, axis=self.axis))


class Stack(Function):
    """out = the inputs stacked along a new axis;  input i gets the gradient's slice i on that axis."""

    def forward(self, *arrays, axis=0):
        self.axis = axis
        return np.stack(arrays, axis=axis)

    def backward(self, g):
        return tuple(np.moveaxis(g, self.axis, 0))


class Embedding(Function):
    """out[...] = W[idx[...]] (a row gather);  dW[v] = sum of g over the positions whose index is v
    (scatter-add: repeated indices add up)."""

    def forward(self, W, idx):
        self.idx, self.V = np.asarray(idx), W.shape[0]
        return W[self.idx]

    def backward(self, g):
        g2 = _rows(g)  # (N, C)
        return kernels.embedding_backward(self.idx.reshape(-1), g2, self.V)


# ---- elementwise functions -----------------------------------------------------------------
class Exp(Function):
    """out = exp(a);  d/da = exp(a) = out."""

    def forward(self, a):
        self.out = np.exp(a)
        return self.out

    def backward(self, g):
        return g * self.out


class Log(Function):
    """out = log(a);  d/da = 1 / a."""

    def forward(self, a):
        self.a = a
        return np.log(a)

    def backward(self, g):
        return g / self.a


class Sigmoid(Function):
    """out = s = 1 / (1 + exp(-a));  d/da = s (1 - s)."""

    def forward(self, a):
        self.out = 0.5 * (1.0 + np.tanh(0.5 * a))  # the same function, without overflow in exp
        return self.out

    def backward(self, g):
        return g * self.out * (1.0 - self.out)


class Tanh(Function):
    """out = tanh(a);  d/da = 1 - out^2."""

    def forward(self, a):
        self.out = np.tanh(a)
        return self.out

    def backward(self, g):
        return g * (1.0 - self.out * self.out)


class ReLU(Function):
    """out = max(a, 0);  d/da = 1 where a > 0, else 0."""

    def forward(self, a):
        self.mask = a > 0
        return a * self.mask

    def backward(self, g):
        return g * self.mask


# ---- fused transformer ops -----------------------------------------------------------------
class Norm(Function):
    """iGPT's norm over the last axis, fused (released iGPT code; not GPT-2's LayerNorm: no
    mean-centring, no bias):

        y = x / sqrt(mean(x^2) + eps) * g

    With r = 1 / sqrt(mean(x^2) + eps), xhat = x r, dxhat = dy g (derivation in kernels.norm_backward):
        dx = r (dxhat - xhat mean(dxhat xhat)),    dg = sum over rows of dy xhat.
    """

    def forward(self, x, g, eps=1e-5):
        self.shape = x.shape
        self.x2 = _rows(x)  # (N, C)
        self.g = g
        y, self.rstd = kernels.norm_forward(self.x2, g, eps)
        return y.reshape(x.shape)

    def backward(self, dy):
        dx, dg = kernels.norm_backward(_rows(dy), self.x2, self.g, self.rstd)
        return dx.reshape(self.shape), dg


class Gelu2(Function):
    """iGPT's activation (released code `gelu2`, Hugging Face `quick_gelu`), fused:

        y = x sigmoid(1.702 x);    dy/dx = s + 1.702 x s (1 - s),  s = sigmoid(1.702 x).
    """

    def forward(self, x):
        self.x = np.ascontiguousarray(x)
        return kernels.gelu2_forward(self.x.reshape(-1)).reshape(x.shape)

    def backward(self, g):
        gf = np.ascontiguousarray(g).reshape(-1)
        return kernels.gelu2_backward(gf, self.x.reshape(-1)).reshape(self.x.shape)


class Softmax(Function):
    """y = exp(x - logsumexp(x)) over axis;  dx = y (g - sum(g y))."""

    def forward(self, x, axis=-1):
        self.axis = axis
        self.out = np.exp(x - kernels.logsumexp(x, axis))
        return self.out

    def backward(self, g):
        y = self.out
        return y * (g - (g * y).sum(axis=self.axis, keepdims=True))


class LogSoftmax(Function):
    """y = x - logsumexp(x) over axis;  dx = g - softmax(x) sum(g)."""

    def forward(self, x, axis=-1):
        self.axis = axis
        self.out = x - kernels.logsumexp(x, axis)
        return self.out

    def backward(self, g):
        return g - np.exp(self.out) * g.sum(axis=self.axis, keepdims=True)


class CrossEntropy(Function):
    """Softmax cross-entropy over the last axis with integer targets, averaged over positions with
    optional per-position weights w (the BERT loss weighs masked positions 1, others 0):

        loss = sum_i w_i (logsumexp(z_i) - z_i[t_i]) / sum_i w_i          (w_i = 1 when not given)
        dloss/dz_i = w_i / sum(w) * (softmax(z_i) - onehot(t_i))
    Returns a scalar in nats. Targets are constants (no gradient).
    """

    def forward(self, z, targets, weights=None):
        V = z.shape[-1]
        self.shape, self.dtype = z.shape, z.dtype
        self.z2 = _rows(z)                                       # (N, V)
        self.t = np.ascontiguousarray(np.asarray(targets).reshape(-1), dtype=np.int64)  # (N,)
        if self.t.size and (self.t.min() < 0 or self.t.max() >= V):
            raise ValueError(f"cross_entropy: targets must lie in [0, {V})")
        if weights is None:
            self.w = np.full(self.t.shape, 1.0 / (self.t.size or 1))
        else:
            w = np.asarray(weights, dtype=np.float64).reshape(-1)
            total = w.sum()
            if total <= 0:
                raise ValueError("cross_entropy: the weights sum to zero (no position is counted)")
            self.w = w / total                                   # (N,) normalised weights
        loss, self.lse = kernels.xent_forward(self.z2, self.t)
        return np.asarray(np.dot(self.w, loss), dtype=z.dtype)

    def backward(self, g):
        coef = np.ascontiguousarray(self.w * np.float64(g))
        return kernels.xent_backward(self.z2, self.t, self.lse, coef).reshape(self.shape)


class Attention(Function):
    """Multi-head scaled dot-product attention on the fused qkv projection (B, T, 3C) -> (B, T, C):

        head h:  O_h = softmax(Q_h K_h^T / sqrt(D) + mask) V_h,     mask = -inf where key j > query i
    (causal=True, the AR model) or no mask (causal=False, the BERT model). Forward and backward are
    the tiled numba kernels in attention.py (formulas in attention.attention_backward). Saved for
    backward: views of qkv and O (arrays the graph holds anyway) and the per-row log-sum-exp; never
    the (T, T) matrix, and no per-head copies (the kernels read each head's rows in place).
    """

    def forward(self, qkv, n_head, causal=True):
        B, T, C3 = qkv.shape
        self.causal = causal
        self.q, self.k, self.v = attention_kernels.heads(qkv, n_head)                  # (B, T, NH, D) views
        D = self.q.shape[-1]
        self.o, self.lse = attention_kernels.attention_forward(self.q, self.k, self.v, causal, 0,
                                                               *attention_kernels.forward_tiles(D, T))
        return self.o.reshape(B, T, C3 // 3)                                            # (B, T, C)

    def backward(self, g):
        B, T, NH, D = self.q.shape
        do = np.ascontiguousarray(g).reshape(B, T, NH, D)
        dqkv = attention_kernels.attention_backward(self.q, self.k, self.v, self.o, self.lse, do,
                                                    self.causal, 0, *attention_kernels.tiles(D))  # (B, T, 3, NH, D)
        return dqkv.reshape(B, T, 3 * NH * D)                                           # (B, T, 3C)


# ---- the public functional API -------------------------------------------------------------
def add(a, b): return Add.apply(a, b)
def sub(a, b): return Sub.apply(a, b)
def mul(a, b): return Mul.apply(a, b)
def div(a, b): return Div.apply(a, b)
def neg(a): return Neg.apply(a)
def pow(a, p: float): return Pow.apply(a, p=p)  # noqa: A001 (mirrors the operator's name)
def matmul(a, b): return MatMul.apply(a, b)
def sum(a, axis=None, keepdims=False): return Sum.apply(a, axis=axis, keepdims=keepdims)  # noqa: A001
def mean(a, axis=None, keepdims=False): return Mean.apply(a, axis=axis, keepdims=keepdims)
def max(a, axis=None, keepdims=False): return Max.apply(a, axis=axis, keepdims=keepdims)  # noqa: A001
def reshape(a, shape): return Reshape.apply(a, shape=tuple(np.atleast_1d(shape)))
def transpose(a, axes=None): return Transpose.apply(a, axes=axes)
def permute(a, *axes): return Transpose.apply(a, axes=axes)
def getitem(a, index): return GetItem.apply(a, index=index)
def concat(tensors, axis=0): return Concat.apply(*tensors, axis=axis)
def stack(tensors, axis=0): return Stack.apply(*tensors, axis=axis)
def embedding(W, idx): return Embedding.apply(W, idx=idx)
def exp(a): return Exp.apply(a)
def log(a): return Log.apply(a)
def sigmoid(a): return Sigmoid.apply(a)
def tanh(a): return Tanh.apply(a)
def relu(a): return ReLU.apply(a)
def norm(x, g, eps=1e-5): return Norm.apply(x, g, eps=eps)
def gelu2(x): return Gelu2.apply(x)
def softmax(x, axis=-1): return Softmax.apply(x, axis=axis)
def log_softmax(x, axis=-1): return LogSoftmax.apply(x, axis=axis)
def cross_entropy(z, targets, weights=None): return CrossEntropy.apply(z, targets=targets, weights=weights)
def attention(qkv, n_head, causal=True): return Attention.apply(qkv, n_head=n_head, causal=causal)

