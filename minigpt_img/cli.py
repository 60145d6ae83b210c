"""What every script (train.py, probe.py, sample.py) does around its own work.

Not a paper section: the scripts' layer. Threads are configured before NumPy loads its BLAS (so this
module imports nothing heavy at the top), and every error a user can cause ends as one line on
stderr and a non-zero exit, never a traceback.
"""
from __future__ import annotations

import argparse
import sys

from .errors import (CheckpointError, ConfigError, DataError, MPIMissing, TrainingDiverged,
                     WriteError)
from .ranges import POSITIVE_INT
from .threads import configure, default_threads


class Parser(argparse.ArgumentParser):
    """argparse, with a bad flag reported in one line (argparse prints the usage too)."""

    def error(self, message):
        self.exit(2, f"error: {message} (python {self.prog} --help lists the flags)\n")


def add_threads_flag(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--threads", type=POSITIVE_INT, default=None,
                    help="CPU threads for numba and BLAS (default: all cores)")


def fair_share(args, comm):
    """The FairShare a script's long loop keeps (threads.FairShare), or None where the thread count
    is fixed: by --threads, or by mpiexec sharing the cores among ranks (default_threads)."""
    from .threads import FairShare
    return None if args.threads or comm.size > 1 else FairShare()


def run(work, args) -> int:
    """Apply --threads, then return work(args, comm)'s exit code, comm being the processes of the
    run (parallel.world(): several under mpiexec). A user's error prints `error: ...` and exits 2 (1
    when training diverged); under mpiexec the failing rank's message ends the whole job."""
    configure(args.threads or default_threads())  # before anything imports NumPy
    from .parallel import world

    try:
        comm = world()
    except MPIMissing as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    code, message = _guarded(work, args, comm)
    if message is not None:
        where = f" (process {comm.rank} of {comm.size})" if comm.size > 1 else ""
        print(f"error{where}: {message}", file=sys.stderr)
        if comm.size > 1:
            comm.abort(code)  # the other ranks would wait for this one forever
    return code


def _guarded(work, args, comm):
    """(exit code, None) or (exit code, the one line that says what went wrong)."""
    try:
        return work(args, comm), None
    except TrainingDiverged as e:
        return 1, str(e)
    except (ConfigError, DataError, CheckpointError, WriteError, ValueError) as e:
        return 2, str(e)
    except OSError as e:  # a file the run reads or writes outside the checked paths
        return 2, f"{e.filename or 'a file'}: {e.strerror or e}: check the disk (space, permissions)"
    except MemoryError:
        return 2, "out of memory: lower --batch-size, --res or the model --size"
    except Exception:
        if comm.size == 1:
            raise
        import traceback
        traceback.print_exc()
        return 1, "an unexpected error (traceback above)"
