"""Parameter holders: Module, Linear, Embedding, Norm.

A Module owns Tensors (its parameters) and sub-Modules as plain attributes; lists of Modules hold
repeated blocks. Parameter names are the attribute paths ("h.0.attn.c_attn.weight"), which is how the
model's names match the Hugging Face ImageGPT state dict. Initial values come from an explicit, seeded
numpy.random.Generator passed in by the caller.

Linear keeps its weight as (in, out) and computes y = x @ W + b: the layout of GPT-2's and Hugging
Face's `Conv1D`, so imported weights need no transpose.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np

from . import ops
from .tensor import Tensor


class Module:
    def forward(self, *args, **kwargs):  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def named_parameters(self, prefix: str = "") -> Iterator[tuple[str, Tensor]]:
        """(dotted name, parameter) for every Tensor attribute, depth first, in definition order."""
        for name, value in vars(self).items():
            if isinstance(value, Tensor):
                yield prefix + name, value
            elif isinstance(value, Module):
                yield from value.named_parameters(f"{prefix}{name}.")
            elif isinstance(value, (list, tuple)):
                for i, item in enumerate(value):
                    if isinstance(item, Module):
                        yield from item.named_parameters(f"{prefix}{name}.{i}.")

    def parameters(self) -> list[Tensor]:
        return [p for _, p in self.named_parameters()]

    def num_parameters(self) -> int:
        return int(sum(p.size for p in self.parameters()))

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.grad = None

    def state_dict(self) -> dict[str, np.ndarray]:
        return {name: p.data for name, p in self.named_parameters()}

    def load_state_dict(self, state: dict[str, np.ndarray], copy: bool = True) -> None:
        """Copy arrays into the parameters; names and shapes must match exactly. copy=False takes
        each array as it is when it already has the parameter's dtype and C order (a loader's fresh
        arrays: the weights of a large model then exist once in memory, not twice)."""
        own = dict(self.named_parameters())
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            raise KeyError(f"state dict mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
        for name, p in own.items():
            value = np.asarray(state[name])
            if value.shape != p.shape:
                raise ValueError(f"{name}: shape {value.shape} in the state dict, {p.shape} in the model")
            p.data = value.astype(p.dtype, copy=True) if copy else np.ascontiguousarray(value, dtype=p.dtype)


def _normal(rng: np.random.Generator | None, shape, std: float, dtype) -> Tensor:
    """N(0, std^2) values; zeros when std is 0 or rng is None (a model whose weights are loaded next:
    np.zeros takes no memory until written, so a large model is not drawn, then thrown away)."""
    if rng is None or std == 0:
        return Tensor(np.zeros(shape, dtype=dtype), requires_grad=True)
    data = rng.standard_normal(shape, dtype=np.float64) * std
    return Tensor(data.astype(dtype), requires_grad=True)


class Linear(Module):
    """y = x @ W (+ b);  W (in, out) ~ N(0, std^2), b = 0."""

    def __init__(self, n_in: int, n_out: int, rng: np.random.Generator, *, std: float = 0.02,
                 bias: bool = False, dtype=np.float32):
        self.weight = _normal(rng, (n_in, n_out), std, dtype)
        if bias:
            self.bias = Tensor(np.zeros(n_out, dtype=dtype), requires_grad=True)

    def forward(self, x):
        y = ops.matmul(x, self.weight)          # (..., in) @ (in, out) -> (..., out)
        return ops.add(y, self.bias) if hasattr(self, "bias") else y


class Embedding(Module):
    """out[...] = W[idx[...]];  W (num, dim) ~ N(0, std^2)."""

    def __init__(self, num: int, dim: int, rng: np.random.Generator, *, std: float = 0.02,
                 dtype=np.float32):
        self.weight = _normal(rng, (num, dim), std, dtype)

    def forward(self, idx):
        return ops.embedding(self.weight, idx)  # (...) ints -> (..., dim)


class Norm(Module):
    """iGPT's norm: y = x / sqrt(mean(x^2) + eps) * g, scale g = 1 at init (no bias, no centring).

    Departure (released iGPT): §2.2 writes n^l = layer_norm(h^l), GPT-2's layer norm, which centres and
    has a bias; the released code, and Hugging Face's ImageGPT, use this norm."""

    def __init__(self, dim: int, *, eps: float = 1e-5, dtype=np.float32):
        self.weight = Tensor(np.ones(dim, dtype=dtype), requires_grad=True)
        self.eps = eps

    def forward(self, x):
        return ops.norm(x, self.weight, self.eps)
