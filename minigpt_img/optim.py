"""§3.4 Training: Adam and the learning-rate schedule.

Adam (Kingma & Ba), per parameter p with gradient g at step t (1-based):
    m = beta1 m + (1 - beta1) g            v = beta2 v + (1 - beta2) g^2
    p = p - lr * ( m / (1 - beta1^t) ) / ( sqrt(v / (1 - beta2^t)) + eps )  -  lr * wd * p
The paper uses beta2 = 0.95 ("0.999 causes loss spikes", §3.4) and no weight decay; weight decay here
is decoupled (AdamW) and off by default.
Schedule: linear warm-up from 0 to lr over `warmup` steps, then cosine decay to 0 at `total` steps.
"""
from __future__ import annotations

import math

import numpy as np

from .tensor import Tensor


class Adam:
    def __init__(self, params: list[Tensor], lr: float = 3e-4, betas=(0.9, 0.95), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        self.params = list(params)
        self.lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, weight_decay
        self.t = 0
        self.m = [np.zeros_like(p.data) for p in self.params]
        self.v = [np.zeros_like(p.data) for p in self.params]

    def step(self, lr: float | None = None) -> None:
        """One update with the gradients in p.grad (parameters without a gradient are left alone)."""
        lr = self.lr if lr is None else lr
        b1, b2 = self.betas
        self.t += 1
        c1 = 1.0 - b1 ** self.t
        c2 = 1.0 - b2 ** self.t
        for p, m, v in zip(self.params, self.m, self.v):
            g = p.grad
            if g is None:
                continue
            m *= b1
            m += (1.0 - b1) * g
            v *= b2
            v += (1.0 - b2) * (g * g)
            if self.weight_decay:
                p.data -= (lr * self.weight_decay) * p.data
            p.data -= (lr / c1) * m / (np.sqrt(v / c2) + self.eps)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def state_dict(self) -> dict[str, np.ndarray]:
        state = {"t": np.array(self.t)}
        for i, (m, v) in enumerate(zip(self.m, self.v)):
            state[f"m.{i}"], state[f"v.{i}"] = m, v
        return state

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Adam's step count and moments, each checked before use: the moments must have their
        parameter's exact shape, be finite, and v must be >= 0 (ValueError otherwise)."""
        t = np.asarray(state["t"])
        if t.shape != () or t.dtype.kind not in "iu" or t < 0:
            raise ValueError(f"opt/t must be a whole number >= 0, got {t!r}")
        for i, p in enumerate(self.params):
            for name, own in ((f"m.{i}", self.m[i]), (f"v.{i}", self.v[i])):
                value = np.asarray(state[name])
                if value.shape != p.shape or value.dtype.kind != "f" or not np.isfinite(value).all():
                    raise ValueError(f"opt/{name} is {value.dtype} {value.shape}, not a finite {p.shape} array")
                if name[0] == "v" and value.min(initial=0) < 0:
                    raise ValueError(f"opt/{name} has negative second moments")
        extra = set(state) - {"t"} - {f"{k}.{i}" for i in range(len(self.params)) for k in "mv"}
        if extra:
            raise ValueError(f"unexpected optimiser entries {sorted(extra)[:3]}")
        self.t = int(t)
        for i in range(len(self.params)):
            self.m[i][...] = state[f"m.{i}"]
            self.v[i][...] = state[f"v.{i}"]


def clip_grad_norm(params: list[Tensor], max_norm: float) -> float:
    """Scale all gradients so their global L2 norm is at most max_norm; returns the norm before."""
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow gives inf: the caller stops
        total = math.sqrt(sum(float(np.dot(p.grad.ravel(), p.grad.ravel())) for p in params
                              if p.grad is not None))
    if max_norm > 0 and total > max_norm:
        for p in params:
            if p.grad is not None:
                p.grad *= max_norm / (total + 1e-6)
    return total


def lr_at(step: int, base_lr: float, warmup: int, total: int, decay: str = "cosine") -> float:
    """Learning rate for 0-based `step`: linear warm-up over `warmup` steps to base_lr, then cosine
    decay to 0 at `total` (decay="cosine", pre-training) or constant (decay="constant", fine-tuning)."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    if decay == "constant" or total <= warmup:
        return base_lr
    progress = min(1.0, (step - warmup) / (total - warmup))
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))
