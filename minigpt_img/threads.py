"""CPU threads for numba and BLAS, set before NumPy loads (so: first thing in a script).

Two thread pools share the cores: OpenBLAS's (matmuls) and numba's OpenMP (the kernels). Each, by
default, keeps its threads spinning for a while after its work, and the spinners then steal the
cores from the other pool's next call: measured here, a micro@16 training step took 1.13 s with the
defaults and 0.57 s with short OpenBLAS spinning and passive OpenMP waiting. `configure` sets those
two (unless the environment already sets them) and, when asked, the thread count of both pools.
This module imports nothing heavy, so calling it before NumPy is possible.
"""
import os

SPIN_SETTINGS = {"OPENBLAS_THREAD_TIMEOUT": "4", "OMP_WAIT_POLICY": "PASSIVE"}
# Variables an MPI launcher sets in each process it starts (Open MPI, MPICH/Hydra, PMIx).
_SIZE_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE")
_LOCAL_SIZE_VARIABLES = ("OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "PMI_LOCAL_SIZE")
COUNT_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")


def configure(threads: int | None = None) -> None:
    """Apply the spin settings (environment values win) and, if given, the thread count."""
    for key, value in SPIN_SETTINGS.items():
        os.environ.setdefault(key, value)
    if threads:
        for key in COUNT_VARIABLES:
            os.environ[key] = str(threads)


def _from_environment(names) -> int:
    for name in names:
        if os.environ.get(name, "").isdigit():
            return max(1, int(os.environ[name]))
    return 1


def launched_processes() -> int:
    """How many processes an MPI launcher started for this run (1 when not under mpiexec)."""
    return _from_environment(_SIZE_VARIABLES)


def local_processes() -> int:
    """How many of them share this machine, and so its cores (1 when not under mpiexec)."""
    return _from_environment(_LOCAL_SIZE_VARIABLES)


def default_threads() -> int | None:
    """Threads per process: all cores (None: the libraries' default) for one process, the cores
    divided among the processes an MPI launcher started on this machine otherwise."""
    local = local_processes()
    return None if local == 1 else max(1, (os.cpu_count() or 1) // local)
