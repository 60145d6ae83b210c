"""Data parallelism over MPI: the same run on 1 or N processes (optional: pip install -e ".[mpi]").

Not a paper section: the paper trains on many GPUs; this spreads one run over several processes or
machines with MPI (mpi4py). Each optimiser step, every rank computes the gradients of its share of
the batch, then one Allreduce over a flat float buffer sums them:

    g = (1/N) sum_r g_r          g_r: the gradient of rank r's equal share of the global batch

so every rank takes the same Adam step on the same weights. The global batch stays what the flags
say (--batch-size x --grad-accum images): each micro-batch is split into N equal slices, so a run's
result does not depend on N beyond the order of floating-point sums.

Without mpiexec (or with one process) `world()` is `Solo`, whose collectives do nothing: the code
that calls them reads the same either way. Work that is not a batch of one step is shared out the
same way everywhere:

    batches(n, size, comm)      this rank's batches of n items (batch b on rank b % N), with a bar
    average(sums, n, comm)      (sum over the ranks of each rank's sums) / n: an evaluation's means
    fan_out(jobs, comm)         independent jobs (probe fits) over the ranks and their threads

Of minigpt_img it imports only the thread settings and the errors; mpi4py only when started under
mpiexec.
"""
from __future__ import annotations

import contextlib
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from tqdm import tqdm

from .errors import MPIMissing
from .threads import current_threads, launched_processes, set_blas_threads



class Solo:
    """One process: rank 0 of 1. Every collective is the identity."""

    rank, size = 0, 1

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def allreduce_sum(self, buf: np.ndarray) -> np.ndarray:
        return buf

    def allreduce_max(self, buf: np.ndarray) -> np.ndarray:
        return buf

    def allreduce_min(self, buf: np.ndarray) -> np.ndarray:
        return buf

    def broadcast(self, buf: np.ndarray) -> np.ndarray:
        return buf

    def allgather_objects(self, obj) -> list:
        return [obj]

    def barrier(self) -> None:
        pass

    @contextlib.contextmanager
    def root_first(self):
        """Rank 0 runs the block first (and writes any cache it fills), then the others run it."""
        yield

    def abort(self, code: int) -> None:
        sys.exit(code)


class MPIWorld(Solo):
    """mpi4py's COMM_WORLD behind the same small interface. Arrays go through the buffer API
    (contiguous NumPy memory, never pickled); only small report objects are gathered as objects."""

    def __init__(self):
        from mpi4py import MPI
        self.MPI, self.comm = MPI, MPI.COMM_WORLD
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()

    def _allreduce(self, buf: np.ndarray, op) -> np.ndarray:
        assert buf.flags.c_contiguous
        self.comm.Allreduce(self.MPI.IN_PLACE, buf, op=op)
        return buf

    def allreduce_sum(self, buf):
        return self._allreduce(buf, self.MPI.SUM)

    def allreduce_max(self, buf):
        return self._allreduce(buf, self.MPI.MAX)

    def allreduce_min(self, buf):
        return self._allreduce(buf, self.MPI.MIN)

    def broadcast(self, buf):
        assert buf.flags.c_contiguous
        self.comm.Bcast(buf, root=0)
        return buf

    def allgather_objects(self, obj) -> list:
        return self.comm.allgather(obj)

    def barrier(self) -> None:
        self.comm.Barrier()

    @contextlib.contextmanager
    def root_first(self):
        if self.rank == 0:
            yield
            self.comm.Barrier()
        else:
            self.comm.Barrier()
            yield

    def abort(self, code: int) -> None:
        sys.stderr.flush()
        self.comm.Abort(code)


def world() -> Solo:
    """The processes of this run: MPIWorld under mpiexec with N > 1, else Solo."""
    if launched_processes() <= 1:
        return Solo()
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        raise MPIMissing(f"started by mpiexec as one of {launched_processes()} processes, but mpi4py is not "
                         "installed: pip install -e \".[mpi]\"") from None
    return MPIWorld()


def disagreements(values: dict, comm: Solo) -> dict:
    """{name: [its value on rank 0, rank 1, ...]} for the values that differ between the ranks, in
    one collective ({} on one process): processes started with different flags would train one run
    on two settings."""
    if comm.size == 1:
        return {}
    every = comm.allgather_objects({k: repr(v) for k, v in values.items()})
    names = sorted(set().union(*every))
    return {k: [v.get(k) for v in every] for k in names if len({v.get(k) for v in every}) > 1}


def share(n: int, comm: Solo) -> slice:
    """This rank's contiguous share of n items split into comm.size equal parts (n divisible)."""
    part = n // comm.size
    return slice(comm.rank * part, (comm.rank + 1) * part)


def strided(n: int, comm: Solo) -> range:
    """Items rank, rank + size, ...: this rank's share of n items that need not divide evenly."""
    return range(comm.rank, n, comm.size)


def batches(n: int, batch_size: int, comm: Solo, desc: str, stop=None):
    """(b, rows) for this rank's batches of n items in batches of batch_size (rows: the slice of
    batch b; batch b on rank b % size), behind a progress bar on rank 0. stop(): checked before
    each batch; when it returns True the loop ends (the caller drops its partial result)."""
    for b in tqdm(strided(-(-n // batch_size), comm), desc=desc, unit="batch", leave=False,
                  disable=not comm.is_root):
        if stop is not None and stop():
            return
        yield b, slice(b * batch_size, (b + 1) * batch_size)


def average(sums, n: int, comm: Solo) -> np.ndarray:
    """The means over n items of what each rank summed over its share of them (float64)."""
    return comm.allreduce_sum(np.array(sums, dtype=np.float64)) / max(n, 1)


def fan_out(jobs: list, comm: Solo) -> list:
    """[job() for job in jobs], the jobs shared out among the ranks (job i on rank i % size) and
    every result returned to every rank, in order. Each rank runs its jobs side by side on as many
    threads as it has (NumPy releases the GIL in its loops), BLAS at one thread each: a fit's
    rounding then never depends on how many threads the machine offers."""
    workers = current_threads()
    set_blas_threads(1)
    try:
        with ThreadPoolExecutor(workers) as pool:
            ids = strided(len(jobs), comm)
            mine = dict(zip(ids, pool.map(lambda i: jobs[i](), ids)))
    finally:
        set_blas_threads(workers)
    merged = {}
    for part in comm.allgather_objects(mine):
        merged.update(part)
    return [merged[i] for i in range(len(jobs))]


class GradientBuffer:
    """One flat float buffer over all parameters' gradients, for a single Allreduce per step."""

    def __init__(self, params, comm: Solo):
        self.params, self.comm = params, comm
        self.flat = np.zeros(sum(p.size for p in params), dtype=params[0].dtype)

    def average(self) -> None:
        """p.grad = the mean of p.grad over the ranks, for every parameter (missing grads count 0)."""
        if self.comm.size == 1:
            return
        views, offset = [], 0
        for p in self.params:
            view = self.flat[offset:offset + p.size]
            view[:] = 0 if p.grad is None else p.grad.ravel()
            views.append(view)
            offset += p.size
        self.comm.allreduce_sum(self.flat)
        self.flat /= self.comm.size
        for p, view in zip(self.params, views):
            p.grad = view.reshape(p.shape).copy()

    def checksum(self) -> np.ndarray:
        """(sum, sum of squares, sum of index-weighted values) of all weights in float64: equal on
        every rank when their weights agree."""
        out = np.zeros(3)
        for i, p in enumerate(self.params):
            d = p.data.astype(np.float64).ravel()
            out += (d.sum(), np.dot(d, d), (i + 1) * d[:: max(1, d.size // 64)].sum())
        return out

    def check_agreement(self) -> None:
        """Raise RuntimeError when the ranks' weights differ (a bug or a broken rank)."""
        if self.comm.size == 1:
            return
        mine = self.checksum()
        high, low = self.comm.allreduce_max(mine.copy()), self.comm.allreduce_min(mine.copy())
        if not np.array_equal(high, low):
            raise RuntimeError(f"the {self.comm.size} processes' weights differ (checksums {low} .. {high}):"
                               " stop and resume from the last checkpoint")
