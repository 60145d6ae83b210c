"""Where a training step's time goes: each op's forward and backward, the optimiser, the data.

    python benchmarks/bench.py --cases profile    (this file: benchmarks/step_profile.py)

One training step is train.py's code path (Trainer.optimizer_step on the built-in data). For the
timed steps every Function of the engine (ops.py) has its forward and backward wrapped in a timer,
and so have the batch assembly, the gradient norm and Adam (which also clips and checks that the
weights are finite); the wrappers live in this benchmark only and are removed afterwards. Matmuls
are told apart by their weight (attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj, lm_head), summed
over the layers. What no wrapper covers (the engine's graph walk, gradient accumulation into .grad,
Python) is the "engine and loop" row. Then a few steps of Trainer.train itself give the share of
train.py's loop spent around the step (progress bar, metrics, schedule, stop checks, FairShare).

Beside each row: its FLOP-bound limit, the op's matmul/attention FLOPs divided by the fp32 GEMM
peak measured in the same run; element-wise ops have none (they are bound by memory).
"""
from __future__ import annotations

import time
from collections import defaultdict

import numpy as np


def _matmul_names(model) -> dict:
    """id(weight array) -> table row, e.g. 'matmul attn.c_attn' for transformer.h.<l>.attn.c_attn.weight."""
    names = {}
    for name, p in model.named_parameters():
        parts = name.split(".")
        if p.data.ndim == 2 and parts[-2] not in ("wte", "wpe"):
            names[id(p.data)] = "matmul " + ".".join(parts[-3:-1] if len(parts) > 2 else parts[:-1])
    return names


class OpTimer:
    """Accumulates wall time per (row, phase) while installed; `install` wraps, `remove` restores."""

    def __init__(self):
        self.seconds, self.flops = defaultdict(float), defaultdict(float)
        self._undo = []

    def _wrap(self, owner, attr, row_of, flops_of=None):
        original = getattr(owner, attr)
        timer = self

        def timed(*args, **kwargs):
            t = time.perf_counter()
            out = original(*args, **kwargs)
            row = row_of(args)
            timer.seconds[row] += time.perf_counter() - t
            if flops_of is not None:
                timer.flops[row] += flops_of(args)
            return out
        setattr(owner, attr, timed)
        self._undo.append((owner, attr, original))

    def install(self, trainer) -> None:
        from minigpt_img import ops, trainer as trainer_module
        from minigpt_img.tensor import Function
        names = _matmul_names(trainer.model)
        for cls in vars(ops).values():
            if not (isinstance(cls, type) and issubclass(cls, Function) and cls is not Function):
                continue
            label = cls.__name__.lower()
            if cls is ops.MatMul:
                def fwd_row(args, n=names):
                    return (n.get(id(args[2]), "matmul other"), "forward")

                def bwd_row(args, n=names):
                    return (n.get(id(args[0].b), "matmul other"), "backward")
                fwd_flops = (lambda args: 2.0 * args[1].size / args[1].shape[-1] * args[2].shape[0]
                             * args[2].shape[1])
                bwd_flops = (lambda args: 4.0 * args[0].a.size / args[0].a.shape[-1] * args[0].b.shape[0]
                             * args[0].b.shape[1])
                self._wrap(cls, "forward", fwd_row, fwd_flops)
                self._wrap(cls, "backward", bwd_row, bwd_flops)
                continue
            if cls is ops.Attention:  # causal: half of QK^T and of PV are computed
                fwd_flops = lambda args: 2.0 * args[1].shape[0] * args[1].shape[1] ** 2 * args[1].shape[2] / 3
                self._wrap(cls, "forward", lambda args, l=label: (l, "forward"), fwd_flops)
                self._wrap(cls, "backward", lambda args, l=label: (l, "backward"),  # twice the forward
                           lambda args: 4.0 * args[0].q.shape[0] * args[0].q.shape[1] ** 2
                           * args[0].q.shape[2] * args[0].q.shape[3])                  # q: (B, T, NH, D)
                continue
            self._wrap(cls, "forward", lambda args, l=label: (l, "forward"))
            self._wrap(cls, "backward", lambda args, l=label: (l, "backward"))
        self._wrap(trainer_module.Trainer, "batch", lambda args: ("data: batch + augmentation", "step"))
        self._wrap(trainer_module, "grad_norm", lambda args: ("gradient norm (for clipping)", "step"))
        self._wrap(type(trainer.opt), "step", lambda args: ("Adam (with clipping, finiteness check)", "step"))

    def remove(self) -> None:
        for owner, attr, original in reversed(self._undo):
            setattr(owner, attr, original)
        self._undo = []


def profile_step(size: str, res: int, batch: int, peak_gflops: float, steps: int = 5) -> dict:
    """Per-row seconds of one step (mean over `steps` after two warm-up steps) and the table."""
    from bench_trainer import bench_trainer
    trainer = bench_trainer(size, res, batch)
    for _ in range(2):
        trainer.optimizer_step(3e-4)
    untimed = []
    for _ in range(steps):  # the step without wrappers, for the wrappers' own cost
        t = time.perf_counter()
        trainer.optimizer_step(3e-4)
        untimed.append(time.perf_counter() - t)
    timer = OpTimer()
    timer.install(trainer)
    try:
        t = time.perf_counter()
        for _ in range(steps):
            trainer.optimizer_step(3e-4)
        total = (time.perf_counter() - t) / steps
    finally:
        timer.remove()
    rows = defaultdict(lambda: {"forward": 0.0, "backward": 0.0, "step": 0.0, "flops": 0.0})
    for (row, phase), s in timer.seconds.items():
        rows[row][phase] += s / steps
    for (row, phase), f in timer.flops.items():
        rows[row]["flops"] += f / steps
    covered = sum(sum(r[p] for p in ("forward", "backward", "step")) for r in rows.values())
    rows["engine and loop (the rest)"]["step"] = max(0.0, total - covered)
    table = []
    for name, r in rows.items():
        seconds = r["forward"] + r["backward"] + r["step"]
        table.append({"row": name, "forward_ms": 1e3 * r["forward"], "backward_ms": 1e3 * r["backward"],
                      "other_ms": 1e3 * r["step"], "share": seconds / total,
                      "flop_bound_ms": 1e3 * r["flops"] / (peak_gflops * 1e9) if r["flops"] else None})
    table.sort(key=lambda r: -r["share"])
    flop_bound = sum(r["flop_bound_ms"] or 0.0 for r in table)
    return {"step_ms": 1e3 * total, "step_ms_unwrapped": 1e3 * float(np.median(untimed)),
            "flop_bound_ms": flop_bound, "rows": table, "loop_share": loop_share(trainer, steps)}


def loop_share(trainer, steps: int) -> float:
    """The share of train.py's loop (Trainer.train) spent outside optimizer_step: progress bar,
    metrics, schedule, stop checks, FairShare. Measured between the first and last of `steps` + 1
    steps, so the final checkpoint is not counted."""
    inside, stamps = [], []
    step = trainer.optimizer_step

    def timed_step(lr):
        t = time.perf_counter()
        out = step(lr)
        inside.append(time.perf_counter() - t)
        return out

    def on_step(t):
        stamps.append(time.perf_counter())
        if len(stamps) == steps + 1:
            t.stop_reason = "interrupted"
    trainer.optimizer_step = timed_step
    try:
        trainer.train(on_step=on_step)
    finally:
        del trainer.optimizer_step
    span = stamps[-1] - stamps[0]
    return 1.0 - sum(inside[1:len(stamps)]) / span


def print_profile(name: str, p: dict) -> None:
    print(f"  {name}: step {p['step_ms']:.1f} ms with timers ({p['step_ms_unwrapped']:.1f} ms without); "
          f"FLOP-bound limit {p['flop_bound_ms']:.1f} ms; train.py's loop around the step: "
          f"{100 * p['loop_share']:.1f}% of its time")
    print(f"    {'row':38s} {'fwd ms':>8s} {'bwd ms':>8s} {'other ms':>8s} {'% step':>7s} {'FLOP-bound ms':>13s}")
    for r in p["rows"]:
        bound = f"{r['flop_bound_ms']:13.2f}" if r["flop_bound_ms"] is not None else f"{'-':>13s}"
        print(f"    {r['row']:38s} {r['forward_ms']:8.2f} {r['backward_ms']:8.2f} {r['other_ms']:8.2f} "
              f"{100 * r['share']:6.1f}% {bound}")
