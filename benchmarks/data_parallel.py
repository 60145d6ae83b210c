"""One measurement for bench.py's data_parallel case: training steps through train.py's Trainer,
in this process or in each rank of `mpiexec -n N`. Prints one JSON line (rank 0):

    {"ranks", "threads", "seconds_per_step", "tokens_per_s", "allreduce_share"}

allreduce_share is the fraction of a step spent averaging gradients (parallel.GradientBuffer.average,
the Allreduce and the copies around it), measured on rank 0.

    python benchmarks/data_parallel.py --threads 2
    mpiexec -n 2 python benchmarks/data_parallel.py --threads 1
"""
import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from minigpt_img.threads import configure  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--threads", type=int, default=1)
ap.add_argument("--size", default="micro")
ap.add_argument("--res", type=int, default=16)
ap.add_argument("--batch-size", type=int, default=16)
ap.add_argument("--steps", type=int, default=12, help="timed steps, after 3 warm-up steps")
args = ap.parse_args()
configure(args.threads)

import numpy as np  # noqa: E402

from bench_trainer import bench_trainer  # noqa: E402

from minigpt_img.parallel import world  # noqa: E402

comm = world()
trainer = bench_trainer(args.size, args.res, args.batch_size, comm=comm, steps=3 + args.steps,
                        eval_every=10**6, log_every=10**6)
stamps, in_allreduce = [], [0.0]
average = trainer.grads.average


def timed_average():
    t = time.perf_counter()
    average()
    if trainer.step >= 3:
        in_allreduce[0] += time.perf_counter() - t


trainer.grads.average = timed_average
trainer.train(on_step=lambda r: stamps.append(time.perf_counter()))
per_step = float(np.median(np.diff(stamps[2:])))
if comm.is_root:
    tokens = trainer.cfg.batch_size * trainer.model.config.n_ctx
    print(json.dumps({"ranks": comm.size, "threads": args.threads, "seconds_per_step": per_step,
                      "tokens_per_s": tokens / per_step,
                      "allreduce_share": in_allreduce[0] / (stamps[-1] - stamps[2])}))
