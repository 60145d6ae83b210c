"""The scaling table of the README's "Training on several machines", worked out on paper.

    python benchmarks/scaling.py

Per size: the bytes one data-parallel step allreduces (every float32 gradient once), the compute time
of one step on one node of this kind (measured here for micro, mini and s by `bench.py --cases
train`; scaled for m and l from s by their FLOPs), and the predicted efficiency at N nodes on 10 and
100 Gb/s links with a ring allreduce, whose time is 2 (N - 1) / N x bytes / bandwidth:

    efficiency = A t / (A t + t_allreduce)        t: one micro-batch's compute, A: --grad-accum

with no overlap of communication and compute (the Allreduce follows the backward pass), and the
smallest A that keeps efficiency at 90% or more.
"""
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from minigpt_img.sizes import config_for, count_parameters  # noqa: E402

# seconds per training step measured on this machine (README benchmark table, bench.py --compare-torch)
MEASURED = {("micro", 16, 16): 0.284, ("mini", 32, 4): 1.499, ("s", 32, 1): 3.246}
CASES = [("micro", 16, 16), ("mini", 32, 4), ("s", 32, 1), ("m", 32, 1), ("l", 32, 1)]
LINKS = {"10 Gb/s": 10e9 / 8, "100 Gb/s": 100e9 / 8}
NODES = (2, 8, 64)


def train_flops(size, res, batch):
    """Multiply-adds x 2 of the matmuls and causal attention, forward + backward (x3)."""
    cfg = config_for(size, res)
    T, C, L = cfg.n_ctx, cfg.n_embd, cfg.n_layer
    matmul = 2 * batch * T * (12 * C * C * L + C * cfg.vocab)
    attention = 2 * batch * L * T * T * C  # QK^T and PV, half of T^2 each for the causal mask
    return 3 * (matmul + attention)


def main():
    s_rate = train_flops("s", 32, 1) / MEASURED[("s", 32, 1)]
    print("| model, batch per node | gradient bytes per step | compute per step | "
          + " | ".join(f"N={n}, {link}" for link in LINKS for n in NODES) + " | --grad-accum for 90% at 10 / 100 Gb/s, N=64 |")
    print("|---" * (3 + len(LINKS) * len(NODES) + 1) + "|")
    for size, res, batch in CASES:
        grad_bytes = 4 * count_parameters(config_for(size, res))
        t = MEASURED.get((size, res, batch), train_flops(size, res, batch) / s_rate)
        cells, accum = [], []
        for link, bandwidth in LINKS.items():
            for n in NODES:
                t_ar = 2 * (n - 1) / n * grad_bytes / bandwidth
                cells.append(f"{t / (t + t_ar):.0%}")
            t_ar64 = 2 * 63 / 64 * grad_bytes / bandwidth
            accum.append(str(max(1, math.ceil(9 * t_ar64 / t))))
        how = "measured" if (size, res, batch) in MEASURED else "scaled from s"
        print(f"| {size}@{res}, {batch} | {grad_bytes / 1e6:,.1f} MB | {t:.2f} s ({how}) | "
              + " | ".join(cells) + f" | {' / '.join(accum)} |")


if __name__ == "__main__":
    main()
