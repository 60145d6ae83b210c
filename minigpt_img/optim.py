"""§3.4 Training: Adam and the learning-rate schedule.

Adam (Kingma & Ba), per parameter p with gradient g at step t (1-based):
    m = beta1 m + (1 - beta1) g            v = beta2 v + (1 - beta2) g^2
    p = p - lr * ( m / (1 - beta1^t) ) / ( sqrt(v / (1 - beta2^t)) + eps )  -  lr * wd * p
§3.4: "We use Adam with beta1 = 0.9 and beta2 = 0.95", and names no weight decay; weight decay here
is decoupled (AdamW) and off by default. Gradient clipping (departure: the paper mentions no gradient clipping): when the global norm
||g|| of all gradients exceeds max_norm, every g is scaled by max_norm / ||g||.
Schedule (§3.4: "The learning rate is warmed up for one epoch, and then decays to 0 following a
cosine schedule"): linear warm-up from 0 to lr over `warmup` steps, then cosine decay to 0 at `total`
steps; constant after the warm-up when fine-tuning ("we do not employ a cosine schedule").
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from .tensor import Tensor


# Adam's update in one pass over each parameter: NumPy's version (the twin below) makes about ten,
# with temporaries, and took 8% of an iGPT-S step (benchmarks/step_profile.py); the clipping factor
# and the finiteness check ride along in the same pass. Exact float arithmetic (no fast-math), in the
# parameter's dtype, in the twin's order, so the two agree to the last bit. The pass over a chunk is a
# function of its own: written inside the parallel loop, it compiled to one square root and two
# divisions at a time instead of eight (measured on 76M parameters, 2 threads, AMD EPYC: 230 -> 60 ms).
_N_CHUNKS = 64


@njit(cache=True, nogil=True, error_model="numpy")
def _adam_chunk(p, g, m, v, g_scale, b1, one_minus_b1, b2, one_minus_b2, step_size, c2, eps, decay):
    """adam_update on one contiguous chunk; returns how many of its updated weights are not finite."""
    not_finite = 0
    for i in range(p.size):
        gi = g[i] * g_scale
        mi = m[i] * b1 + one_minus_b1 * gi
        vi = v[i] * b2 + one_minus_b2 * (gi * gi)
        m[i], v[i] = mi, vi
        w = p[i]
        if decay != 0:
            w = w - decay * w
        w = w - step_size * mi / (np.sqrt(vi / c2) + eps)
        p[i] = w
        not_finite += not np.isfinite(w)
    return not_finite


# A parallel loop wakes numba's sleeping threads (OMP_WAIT_POLICY=PASSIVE, threads.configure), and
# one right after another waited ~66 us for it here (2 threads of an Intel Xeon, a virtual machine;
# 6 us after a pause), longer than the update of a few hundred thousand weights takes on one thread
# (~0.8 ns a weight). Parameters below PARALLEL_SIZE are updated on the calling thread: measured,
# Adam.step at micro (28 tensors, 0.95M weights, all below) 6.4 -> 0.75 ms, mini (6.8M weights, all
# below) 15.4 -> 8.8 ms, s (77M weights) 85-90 -> 74-77 ms; 2^18 and 2^20 were slower at mini and s.
PARALLEL_SIZE = 1 << 19


def adam_update(p, g, m, v, g_scale, b1, one_minus_b1, b2, one_minus_b2, step_size, c2, eps, decay):
    """In place on flat arrays of one dtype (the scalars of that dtype too): g' = g_scale g, then the
    update of the module docstring with step_size = lr / (1 - beta1^t), c2 = 1 - beta2^t and
    decay = lr * wd (0: none). Returns whether every updated weight is finite."""
    scalars = (g_scale, b1, one_minus_b1, b2, one_minus_b2, step_size, c2, eps, decay)
    if p.size < PARALLEL_SIZE:
        return _adam_chunk(p, g, m, v, *scalars) == 0
    return _adam_chunks(p, g, m, v, *scalars)


@njit(parallel=True, cache=True, nogil=True, error_model="numpy")
def _adam_chunks(p, g, m, v, g_scale, b1, one_minus_b1, b2, one_minus_b2, step_size, c2, eps, decay):
    """adam_update in _N_CHUNKS chunks on numba's threads."""
    n = p.size
    not_finite = np.zeros(_N_CHUNKS, dtype=np.int64)
    for c in prange(_N_CHUNKS):
        lo, hi = c * n // _N_CHUNKS, (c + 1) * n // _N_CHUNKS
        not_finite[c] = _adam_chunk(p[lo:hi], g[lo:hi], m[lo:hi], v[lo:hi], g_scale, b1, one_minus_b1,
                                    b2, one_minus_b2, step_size, c2, eps, decay)
    return not_finite.sum() == 0


def adam_update_ref(p, g, m, v, g_scale, b1, one_minus_b1, b2, one_minus_b2, step_size, c2, eps, decay):
    g = g * g_scale
    m *= b1
    m += one_minus_b1 * g
    v *= b2
    v += one_minus_b2 * (g * g)
    if decay != 0:
        p -= decay * p
    p -= step_size * m / (np.sqrt(v / c2) + eps)
    return bool(np.isfinite(p).all())


class Adam:
    def __init__(self, params: list[Tensor], lr: float = 3e-4, betas=(0.9, 0.95), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        self.params = list(params)
        self.lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, weight_decay
        self.t = 0
        self.m = [np.zeros_like(p.data) for p in self.params]
        self.v = [np.zeros_like(p.data) for p in self.params]

    def step(self, lr: float | None = None, grad_scale: float = 1.0) -> bool:
        """One update with the gradients in p.grad times grad_scale (the clipping factor; parameters
        without a gradient are left alone). Returns whether all updated weights are finite."""
        lr = self.lr if lr is None else lr
        b1, b2 = self.betas
        self.t += 1
        finite = True
        for p, m, v in zip(self.params, self.m, self.v):
            if p.grad is None:
                continue
            f = p.data.dtype.type  # every scalar in the parameter's precision, as NumPy would use
            scalars = (f(grad_scale), f(b1), f(1.0 - b1), f(b2), f(1.0 - b2), f(lr / (1.0 - b1 ** self.t)),
                       f(1.0 - b2 ** self.t), f(self.eps), f(lr * self.weight_decay))
            grad = np.ascontiguousarray(p.grad, dtype=p.data.dtype)
            finite &= adam_update(p.data.reshape(-1), grad.reshape(-1), m.reshape(-1), v.reshape(-1), *scalars)
        return finite

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


def grad_norm(params: list[Tensor]) -> float:
    """The global L2 norm of all gradients (inf or NaN if one overflowed: the caller stops)."""
    with np.errstate(over="ignore", invalid="ignore"):
        return math.sqrt(sum(float(np.dot(p.grad.ravel(), p.grad.ravel())) for p in params
                             if p.grad is not None))


def clip_factor(norm: float, max_norm: float) -> float:
    """Gradient clipping (departure: the paper mentions none): the factor that brings a global norm
    above max_norm down to it (1.0 when
    max_norm is 0, no clipping); Adam.step applies it in its pass over the gradients."""
    return max_norm / (norm + 1e-6) if 0 < max_norm < norm else 1.0


def lr_at(step: int, base_lr: float, warmup: int, total: int, decay: str = "cosine") -> float:
    """Learning rate for 0-based `step`: linear warm-up over `warmup` steps to base_lr, then cosine
    decay to 0 at `total` (decay="cosine", pre-training) or constant (decay="constant", fine-tuning)."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    if decay == "constant" or total <= warmup:
        return base_lr
    progress = min(1.0, (step - warmup) / (total - warmup))
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))
