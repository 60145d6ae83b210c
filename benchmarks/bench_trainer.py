"""The benchmarks' Trainer: train.py's code path in a fresh temporary run folder."""
from __future__ import annotations

import tempfile


def bench_trainer(size: str, res: int, batch: int, comm=None, fair_share=None, **settings):
    """A quiet Trainer of `size` at res x res, batch `batch`, planned for 10^6 steps with no samples
    at the end (other RunConfig fields in `settings`), writing into a new temporary folder: rank 0
    makes it and tells the other ranks under MPI. The data is the built-in `shapes`, whose colours
    fill the paper's 512-colour palette (the default `streaks` has two: a vocabulary of 2)."""
    from minigpt_img.parallel import Solo
    from minigpt_img.runconfig import resolve_config
    from minigpt_img.trainer import Trainer
    comm = comm or Solo()
    root = comm.allgather_objects(tempfile.mkdtemp(prefix="bench-") if comm.is_root else None)[0]
    # shapes: 512 colours, as PyTorch's side; wrn: the augmentation the README's tables were measured with
    run = resolve_config({"size": size, "res": res, "batch_size": batch, "steps": 10**6, "samples": 0,
                          "data": "shapes", "augment": "wrn", "out": f"{root}/run", "cache_dir": f"{root}/cache",
                          **settings})
    return Trainer(run, log=lambda *a: None, comm=comm, fair_share=fair_share)
