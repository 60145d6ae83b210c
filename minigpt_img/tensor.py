"""The autograd engine: Tensor, Function and reverse-mode backward.

Not a paper section: this is the machinery every section stands on. A Tensor wraps a NumPy array
(float32 by default, float64 kept as float64 for gradient checks). Every differentiable operation is
a Function subclass in ops.py with `forward` and `backward` side by side. Calling `Function.apply`
runs the forward on arrays and, when gradients are wanted, records the Function as the output's
creator. `Tensor.backward` then walks the recorded graph in reverse topological order and applies
the chain rule:

    dL/d(input_i) = sum over every use of input_i of  backward(dL/d(output))_i

so a tensor used twice, as in (x + x) * x, receives the sum of its contributions.

Only leaves (tensors created by the user with requires_grad=True, such as parameters) keep `.grad`;
gradients of intermediate tensors live only while backward runs. Leaf gradients ACCUMULATE across
backward calls until `zero_grad` (or setting `.grad = None`), which is what gradient accumulation
over micro-batches needs.
"""
from __future__ import annotations

import contextlib
import contextvars

import numpy as np

# Whether operations record the graph. A context variable rather than a module global: it is
# per-thread/per-task and only `no_grad` changes it, for the duration of a `with` block.
_GRAD_ENABLED = contextvars.ContextVar("minigpt_img_grad_enabled", default=True)


@contextlib.contextmanager
def no_grad():
    """Run the block without recording the graph (evaluation, sampling, feature extraction)."""
    token = _GRAD_ENABLED.set(False)
    try:
        yield
    finally:
        _GRAD_ENABLED.reset(token)


def recording() -> bool:
    """Whether operations record the graph now (False inside no_grad)."""
    return _GRAD_ENABLED.get()


def _as_array(data, dtype=None) -> np.ndarray:
    """Arrays keep float32/float64; Python numbers and integer/bool arrays become float32."""
    arr = np.asarray(data)
    if dtype is not None:
        return arr.astype(dtype, copy=False)
    if arr.dtype in (np.float32, np.float64):
        return arr
    return arr.astype(np.float32)


class Tensor:
    """An n-d array with an optional gradient and the Function that created it."""

    __array_priority__ = 100  # so that `ndarray * Tensor` defers to Tensor.__rmul__

    def __init__(self, data, requires_grad: bool = False, dtype=None):
        self.data = _as_array(data, dtype)
        self.requires_grad = bool(requires_grad)
        self.grad: np.ndarray | None = None
        self._ctx: Function | None = None  # the Function that produced this tensor, if recorded

    # ---- array-like conveniences -------------------------------------------------------------
    @property
    def shape(self) -> tuple:
        return self.data.shape

    @property
    def ndim(self) -> int:
        return self.data.ndim

    @property
    def dtype(self):
        return self.data.dtype

    @property
    def size(self) -> int:
        return self.data.size

    def numpy(self) -> np.ndarray:
        return self.data

    def item(self) -> float:
        return self.data.item()

    def detach(self) -> "Tensor":
        """The same data, cut from the graph."""
        return Tensor(self.data)

    def zero_grad(self) -> None:
        self.grad = None

    def __len__(self) -> int:
        return len(self.data)

    def __repr__(self) -> str:
        flag = ", requires_grad=True" if self.requires_grad else ""
        return f"Tensor(shape={self.shape}, dtype={self.dtype}{flag})"

    # ---- backward ----------------------------------------------------------------------------
    def backward(self, grad=None) -> None:
        """Back-propagate from this tensor. `grad` is dL/d(self); defaults to 1 for a scalar."""
        if grad is None:
            if self.data.size != 1:
                raise ValueError("backward() without a gradient needs a scalar tensor")
            grad = np.ones_like(self.data)
        grad = np.asarray(grad, dtype=self.data.dtype)
        if grad.shape != self.shape:
            raise ValueError(f"gradient shape {grad.shape} does not match tensor shape {self.shape}")

        order = _topological_order(self)
        # grads[id(t)] = [array, owned]; `owned` means the array is ours to add into in place.
        grads: dict[int, list] = {id(self): [grad, False]}
        for t in reversed(order):
            entry = grads.pop(id(t), None)
            if entry is None:
                continue
            g = entry[0]
            if t._ctx is None:  # a leaf: keep (and accumulate) its gradient
                if t.requires_grad:
                    if t.grad is None:
                        t.grad = np.array(g, dtype=t.data.dtype, copy=True)
                    else:
                        t.grad += g
                continue
            ctx = t._ctx
            input_grads = ctx.backward(g)
            if not isinstance(input_grads, tuple):
                input_grads = (input_grads,)
            for parent, pg in zip(ctx.inputs, input_grads):
                if pg is None or not parent.requires_grad:
                    continue
                slot = grads.get(id(parent))
                if slot is None:
                    grads[id(parent)] = [pg, False]
                elif slot[1]:
                    slot[0] += pg
                else:
                    slot[0] = slot[0] + pg  # a fresh array: safe to add into from now on
                    slot[1] = True

    # ---- operators: thin wrappers over ops.py ------------------------------------------------
    def __add__(self, other): return ops.add(self, other)
    def __radd__(self, other): return ops.add(other, self)
    def __sub__(self, other): return ops.sub(self, other)
    def __rsub__(self, other): return ops.sub(other, self)
    def __mul__(self, other): return ops.mul(self, other)
    def __rmul__(self, other): return ops.mul(other, self)
    def __truediv__(self, other): return ops.div(self, other)
    def __rtruediv__(self, other): return ops.div(other, self)
    def __neg__(self): return ops.neg(self)
    def __pow__(self, exponent): return ops.pow(self, exponent)
    def __matmul__(self, other): return ops.matmul(self, other)
    def __rmatmul__(self, other): return ops.matmul(other, self)
    def __getitem__(self, index): return ops.getitem(self, index)

    @property
    def T(self): return ops.transpose(self)

    def sum(self, axis=None, keepdims=False): return ops.sum(self, axis, keepdims)
    def mean(self, axis=None, keepdims=False): return ops.mean(self, axis, keepdims)
    def max(self, axis=None, keepdims=False): return ops.max(self, axis, keepdims)
    def reshape(self, *shape): return ops.reshape(self, shape[0] if len(shape) == 1 else shape)
    def transpose(self, *axes): return ops.transpose(self, axes if axes else None)
    def exp(self): return ops.exp(self)
    def log(self): return ops.log(self)


def _topological_order(root: Tensor) -> list[Tensor]:
    """Tensors reachable from root, each after all of its inputs (iterative DFS: deep nets are deep)."""
    order, visited = [], set()
    stack = [(root, False)]
    while stack:
        t, expanded = stack.pop()
        if expanded:
            order.append(t)
            continue
        if id(t) in visited:
            continue
        visited.add(id(t))
        stack.append((t, True))
        if t._ctx is not None:
            for parent in t._ctx.inputs:
                if parent.requires_grad and id(parent) not in visited:
                    stack.append((parent, False))
    return order


class Function:
    """One differentiable operation. Subclasses define, side by side:

        forward(self, *arrays, **params) -> array        (may save what backward needs on self)
        backward(self, grad_out) -> grad per Tensor input (None where no gradient is needed)

    `apply(*inputs, **params)` converts inputs to Tensors, runs forward on their arrays and, when
    any input needs a gradient and recording is on, links the output to this Function.
    """

    inputs: tuple[Tensor, ...] = ()

    def forward(self, *arrays, **params):  # pragma: no cover - abstract
        raise NotImplementedError

    def backward(self, grad_out):  # pragma: no cover - abstract
        raise NotImplementedError

    def needs_grad(self, i: int) -> bool:
        """Whether input i wants a gradient (lets backward skip work)."""
        return self.inputs[i].requires_grad

    @classmethod
    def apply(cls, *inputs, **params) -> Tensor:
        # A bare Python number takes the dtype of the tensors it meets (float32 stays float32).
        dtype = next((x.dtype for x in inputs if isinstance(x, Tensor)), np.float32)
        tensors = tuple(x if isinstance(x, Tensor)
                        else Tensor(x, dtype=dtype if isinstance(x, (int, float)) else None)
                        for x in inputs)
        fn = cls()
        out = Tensor(fn.forward(*(t.data for t in tensors), **params))
        if recording() and any(t.requires_grad for t in tensors):
            fn.inputs = tensors
            out.requires_grad = True
            out._ctx = fn
        return out


from . import ops  # noqa: E402  (ops needs Tensor and Function defined above)
