"""What a run will cost, said before it is paid: memory, time per step, epoch and run, and what
would fit when that is days.

Not a paper section: the paper trains on TPUs (§3.4: "for all other models we use a batch size of
128 and train for 1M iterations"); on a CPU its iGPT-S takes days per epoch, and a user deciding what
to run needs to know before the first hour is spent.

    peak memory  ~ sizes.training_bytes(model, batch per process)       (weights, Adam, activations)
    run time     = seconds per step x steps left                          (a step timed after compiling)
    N processes  ~ seconds per step / N + ring Allreduce of 4 P bytes    (mpiexec -n N, one per machine:
                   = 2 (N - 1) / N x 4 P / bandwidth                      every step exchanges the
                                                                          gradients of P parameters)
    another size ~ seconds per step x F(size, res) / F(this size, res)  F = L (12 C^2 T + 2 C T^2):
                                                                          the matmuls and attention
"""
from __future__ import annotations

from .sizes import SIZES, count_parameters, training_bytes

LINK_BYTES_PER_S = 10e9 / 8  # a 10 Gb/s network between the machines of an mpiexec run
DAY = 86400.0


def human_time(seconds: float) -> str:
    """0.31 s, 45 s, 12.5 min, 3.2 hours or 10.4 days."""
    if seconds < 10:
        return f"{seconds:.2g} s"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    if seconds < 2 * DAY:
        return f"{seconds / 3600:.1f} hours"
    return f"{seconds / DAY:.1f} days"


def human_bytes(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def step_flops(n_layer: int, n_embd: int, n_ctx: int) -> float:
    """F above: the multiply-adds of one image's forward pass, up to a constant."""
    return n_layer * (12 * n_embd ** 2 * n_ctx + 2 * n_embd * n_ctx ** 2)


def memory_line(model_cfg, batch: int) -> str:
    """Parameters and the estimated peak memory of a training step (sizes.training_bytes)."""
    return (f"{count_parameters(model_cfg) / 1e6:.2f}M parameters, peak memory about "
            f"{human_bytes(training_bytes(model_cfg, batch))} at {batch} images per micro-batch")


def allreduce_seconds(n_params: int, processes: int) -> float:
    return 2 * (processes - 1) / processes * 4 * n_params / LINK_BYTES_PER_S


def forecast(per_step: float, steps_left: int, steps_per_epoch: int, model_cfg, size: str,
             budget_left: float | None = None) -> list:
    """The lines of the estimate: per step, per epoch and for the run; when the run takes days,
    what would fit: another --size or --res, or mpiexec over N machines."""
    run = per_step * steps_left
    lines = [f"about {human_time(per_step)} per step: {human_time(per_step * steps_per_epoch)} per epoch, "
             f"{human_time(run)} for the {steps_left} steps to go"]
    if budget_left is not None and budget_left < run:
        lines[0] += f", but --time-budget stops the run in {human_time(budget_left)}"
    if run < DAY:
        return lines
    here = step_flops(model_cfg.n_layer, model_cfg.n_embd, model_cfg.n_ctx)
    options = []
    for name, (n_layer, n_embd, *_rest) in SIZES.items():
        if name in ("nano", size) or n_layer >= model_cfg.n_layer:
            continue
        options.append(f"--size {name}: {human_time(run * step_flops(n_layer, n_embd, model_cfg.n_ctx) / here)}")
    if model_cfg.n_px > 16:
        smaller = step_flops(model_cfg.n_layer, model_cfg.n_embd, 16 * 16)
        options.append(f"--res 16: {human_time(run * smaller / here)}")
    lines.append("that is days on this machine; roughly, at the same steps: " + ", ".join(options))
    P = count_parameters(model_cfg)
    spread = [f"{n}: {human_time(steps_left * (per_step / n + allreduce_seconds(P, n)))}" for n in (8, 64)]
    lines.append(f"or over N machines like this one: `mpiexec -n N python train.py ...` with a --batch-size that "
                 f"N divides (docs/reference.md; each machine computes 1/N of every step, and {human_bytes(4 * P)} "
                 f"of gradients cross a 10 Gb/s network per step): N = " + ", N = ".join(spread))
    return lines
