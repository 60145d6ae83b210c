"""What every script (train.py, probe.py, sample.py) does around its own work.

Not a paper section: the scripts' layer. Threads are configured before NumPy loads its BLAS (so this
module imports nothing heavy at the top), and every error a user can cause ends as one line on
stderr and a non-zero exit, never a traceback.
"""
from __future__ import annotations

import argparse
import sys

from .errors import (CheckpointError, ConfigError, DataError, Interrupted, MPIMissing, TrainingDiverged,
                     WriteError)
from .ranges import Range
from .threads import configure, default_threads


class Parser(argparse.ArgumentParser):
    """argparse, with a bad flag reported in one line (argparse prints the usage too)."""

    def error(self, message):
        self.exit(2, f"error: {message} (python {self.prog} --help lists the flags)\n")


THREADS = Range(int, 1, 1024)  # numba's thread pool crashed at 100,000 (a SIGSEGV, no message)


def add_threads_flag(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--threads", type=THREADS, default=None,
                    help=f"CPU threads for numba and BLAS, {THREADS.what} (default: all cores)")


def fair_share(args, comm):
    """The FairShare a script's long loop keeps (threads.FairShare), or None where the thread count
    is fixed: by --threads, or by mpiexec sharing the cores among ranks (default_threads)."""
    from .threads import FairShare
    return None if args.threads or comm.size > 1 else FairShare()


def run(work, args, decoding: bool = False) -> int:
    """Apply --threads (threads.configure, decoding for sample.py), then return work(args, comm)'s
    exit code, comm being the processes of the run (parallel.world(): several under mpiexec). A
    user's error prints `error: ...` and exits 2 (1 when training diverged, 130 when Ctrl-C stopped it
    at once); under mpiexec the failing rank's message ends the whole job."""
    configure(args.threads or default_threads(), decoding)  # before anything imports NumPy
    from .parallel import disagreements, world

    try:
        comm = world()
    except MPIMissing as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    differ = disagreements(vars(args), comm)  # every rank learns the same: all stop, rank 0 says why
    if differ:
        if comm.is_root:
            shown = "; ".join(f"--{k.replace('_', '-')} " + ", ".join(f"{v} on process {r}" for r, v in enumerate(vals))
                              for k, vals in differ.items())
            print(f"error: the processes were started with different flags ({shown}): start every process "
                  "with the same command", file=sys.stderr)
        return 2
    code, message = _guarded(work, args, comm)
    if message is not None:  # one line: a newline in a file's name must not forge another
        message = message.replace("\r", "\\r").replace("\n", "\\n")
        where = f" (process {comm.rank} of {comm.size})" if comm.size > 1 else ""
        print(f"{'stopped' if code == 130 else 'error'}{where}: {message}", file=sys.stderr)
        if comm.size > 1:
            comm.abort(code)  # the other ranks would wait for this one forever
    return code


def _guarded(work, args, comm):
    """(exit code, None) or (exit code, the one line that says what went wrong)."""
    try:
        return work(args, comm), None
    except TrainingDiverged as e:
        return 1, str(e)
    except Interrupted as e:  # a second Ctrl-C during training
        return 130, str(e)
    except KeyboardInterrupt:  # Ctrl-C outside the training loop (loading, compiling, probing ...)
        return 130, "interrupted: nothing more was written (the files saved before are intact)"
    except (ConfigError, DataError, CheckpointError, WriteError, ValueError) as e:
        return 2, str(e)
    except OSError as e:  # a file the run reads or writes outside the checked paths
        return 2, f"{e.filename or 'a file'}: {e.strerror or e}: check the disk (space, permissions)"
    except MemoryError:
        return 2, "out of memory: this machine cannot hold what was asked; ask for less at once (fewer images, " \
                  "a smaller --batch-size, --res or model)"
    except Exception:
        if comm.size == 1:
            raise
        import traceback
        traceback.print_exc()
        return 1, "an unexpected error (traceback above)"
