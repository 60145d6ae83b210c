"""What every script (train.py, probe.py, sample.py) does around its own work.

Not a paper section: the scripts' layer. Threads are configured before NumPy loads its BLAS (so this
module imports nothing heavy at the top), and every error a user can cause ends as one line on
stderr and a non-zero exit, never a traceback.
"""
from __future__ import annotations

import argparse
import sys

from .threads import configure


def add_threads_flag(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads for numba and BLAS (default: all cores)")


def run(work, args) -> int:
    """Apply --threads, then return work(args)'s exit code; a user's error prints `error: ...` and
    exits 2 (1 when training diverged)."""
    configure(args.threads)  # before NumPy loads its BLAS
    from .checkpoint import CheckpointError
    from .data import DataError
    from .runconfig import ConfigError
    from .trainer import TrainingDiverged

    try:
        return work(args)
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (ConfigError, DataError, CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
