"""A shared CPU: a training step of micro@16 batch 16 alone, beside a busy single-threaded process, and
beside a second job of the same kind (both timed), for ours and for PyTorch eager.

    python benchmarks/bench.py --cases contention [--compare-torch]

Each job is a child process (this file) that trains for a fixed wall-clock window and prints the
median step time of its window (the first steps after start-up left out). Ours runs train.py's
loop (Trainer.train) with the thread count train.py uses: FairShare, which lowers the thread count
while other processes keep cores busy, or a fixed count as with --threads ("ours, fixed threads").
PyTorch keeps the thread count it starts with, as it does when a user runs it: once with its
defaults (OpenMP threads spin while they wait for work) and once with OMP_WAIT_POLICY=PASSIVE, the
waiting policy ours sets (threads.py).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

BUSY = [sys.executable, "-c", "while True: pass"]
SIZE, RES, BATCH = "micro", 16, 16


def child_ours(seconds: float, fair_share: bool) -> dict:
    from bench_trainer import bench_trainer

    from minigpt_img.threads import FairShare
    share = FairShare() if fair_share else None
    trainer = bench_trainer(SIZE, RES, BATCH, fair_share=share, eval_every=10**6, time_budget=seconds / 60)
    stamps, threads = [], []

    def on_step(t):
        stamps.append(time.perf_counter())
        threads.append(share.threads if share else None)
    trainer.train(on_step=on_step)
    return _summary(stamps, threads)


def child_torch(seconds: float, threads: int) -> dict:
    from torch_ref import TorchStep

    from minigpt_img.sizes import config_for
    step = TorchStep(config_for(SIZE, RES), BATCH, threads)
    stamps, t0 = [], time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        step.train_step()
        stamps.append(time.perf_counter())
    return _summary(stamps, [threads] * len(stamps))


def _summary(stamps, threads) -> dict:
    import numpy as np
    steps = np.diff(stamps)[3:]  # the first steps load caches and settle
    used = [t for t in threads[4:] if t is not None]
    return {"step_s": float(np.median(steps)), "steps": len(steps),
            "threads": float(np.mean(used)) if used else None}


IMPLS = {"ours": ["--fair-share"], "ours, fixed threads": [], "torch": ["--torch"],
         "torch, passive waiting": ["--torch", "--passive"]}


def _job(impl: str, seconds: float, threads: int) -> list:
    flag = IMPLS[impl]
    return [sys.executable, __file__, "--child", "--seconds", str(seconds), "--threads", str(threads)] + flag


def _run(commands: list, background: list | None = None) -> list:
    """Start the commands together (and the background process, killed after); their JSON results."""
    bg = subprocess.Popen(background) if background else None
    try:
        procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for c in commands]
        outs = [p.communicate() for p in procs]
        for p, (_, err) in zip(procs, outs):
            if p.returncode:
                raise RuntimeError(f"a contention job failed:\n{err[-2000:]}")
    finally:
        if bg is not None:
            bg.kill()
            bg.wait()
    return [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]


def bench_contention(seconds: float, threads: int, compare_torch: bool) -> dict:
    impls = ["ours", "ours, fixed threads"] + (["torch", "torch, passive waiting"] if compare_torch else [])
    results = {}
    print(f"a shared CPU: {SIZE}@{RES} batch {BATCH}, {threads} threads each, {seconds:.0f} s windows")
    for impl in impls:
        job = _job(impl, seconds, threads)
        alone = _run([job])[0]
        busy = _run([job], BUSY)[0]
        pair = _run([job, job])
        r = {"alone_s": alone["step_s"], "beside_busy_s": busy["step_s"], "threads_alone": alone["threads"],
             "pair_s": [p["step_s"] for p in pair], "threads_beside_busy": busy["threads"],
             "threads_in_pair": [p["threads"] for p in pair]}
        r["slowdown_beside_busy"] = r["beside_busy_s"] / r["alone_s"]
        r["slowdown_in_pair"] = max(r["pair_s"]) / r["alone_s"]
        results[impl] = r
        print(f"  {impl:22s} alone {1e3 * r['alone_s']:7.1f} ms | beside a busy process "
              f"{1e3 * r['beside_busy_s']:7.1f} ms ({r['slowdown_beside_busy']:.1f}x) | two jobs "
              f"{' and '.join(f'{1e3 * s:.1f}' for s in r['pair_s'])} ms ({r['slowdown_in_pair']:.1f}x)")
    return results


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--seconds", type=float, default=40.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--fair-share", action="store_true")
    ap.add_argument("--torch", action="store_true")
    ap.add_argument("--passive", action="store_true", help="PyTorch with OMP_WAIT_POLICY=PASSIVE")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    if not args.torch:
        from minigpt_img.threads import configure
        configure(args.threads)  # before NumPy loads: our spin settings and thread count
    elif args.passive:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    if args.torch:
        import torch
        torch.set_num_threads(args.threads)
        result = child_torch(args.seconds, args.threads)
    else:
        result = child_ours(args.seconds, args.fair_share)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
