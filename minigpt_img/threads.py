"""CPU threads for numba and BLAS, set before NumPy loads (so: first thing in a script).

Two thread pools share the cores: OpenBLAS's (matmuls) and numba's OpenMP (the kernels). Each, by
default, keeps its threads spinning for a while after its work, and the spinners then steal the
cores from the other pool's next call: measured here, a micro@16 training step took 1.13 s with the
defaults and 0.57 s with short OpenBLAS spinning and passive OpenMP waiting. `configure` sets those
two (unless the environment already sets them; for decoding, which calls no BLAS between its short
parallel loops, only the first) and, when asked, the thread count of both pools.
`configure` imports nothing heavy, so calling it before NumPy is possible; it also sets how the C
library's malloc keeps freed memory (`keep_freed_memory`). `FairShare` changes the
thread count of a running process when other processes load the machine. Two rules hold whatever
the environment: the BLAS that numba's kernels call inside their own threads runs on one thread
(`serial_kernel_blas`), and a decoding step runs its tiny kernels on the calling thread and the rest
on numba's pool at the count in effect when its KV cache was made (`kernels_on_this_thread`,
`numba_threads`), so that its many small steps never hand the cores between the pools.
"""
import functools
import os
import time
from contextlib import contextmanager

SPIN_SETTINGS = {"OPENBLAS_THREAD_TIMEOUT": "4", "OMP_WAIT_POLICY": "PASSIVE"}
# Variables an MPI launcher sets in each process it starts (Open MPI, MPICH/Hydra, PMIx).
_SIZE_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE")
_LOCAL_SIZE_VARIABLES = ("OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "PMI_LOCAL_SIZE")
COUNT_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")


def configure(threads: int | None = None, decoding: bool = False) -> None:
    """Apply the spin settings (environment values win), if given the thread count, and
    keep_freed_memory(). decoding (sample.py): numba's idle threads keep OpenMP's default wait (spin
    a short while, then sleep) instead of sleeping at once. A decoding step runs ~100 short parallel
    loops and no BLAS, so there is no other pool to leave the cores to, and waking sleeping threads
    for every loop cost a quarter of the speed (measured on an Intel Xeon, 2 threads, iGPT-S size, 4
    images: 91-99 tokens/s against 116-126)."""
    for key, value in SPIN_SETTINGS.items():
        if not (decoding and key == "OMP_WAIT_POLICY"):
            os.environ.setdefault(key, value)
    if threads:
        for key in COUNT_VARIABLES:
            os.environ[key] = str(threads)
    keep_freed_memory()


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
KEEP_AT_TOP = 1 << 30  # bytes of freed memory the heap may keep at its top before returning them


def keep_freed_memory() -> bool:
    """glibc's malloc serves every block from its heap and keeps what is freed (up to KEEP_AT_TOP),
    instead of mapping fresh pages for each block above its mmap threshold (at most 32 MB) and
    unmapping them when freed. A forward pass over a batch allocates and frees activations of tens of
    MB in every layer, and the kernel faults in and zeroes every page of a fresh mapping: measured
    (2026-12-03, AMD EPYC, 2 threads) a forward pass of 8 images at iGPT-S size, 11.4 -> 9.7 s, its
    2 s of kernel time gone, peak RSS 760 -> 743 MB; training steps unchanged. For the whole process;
    True where applied (glibc), False elsewhere."""
    import ctypes
    import platform
    if platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)                                     # this process's own C library
    return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, KEEP_AT_TOP))


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


# ---- a fair share of a shared machine ----------------------------------------------------------
# Both pools are fork-join: each parallel region (hundreds per training step) waits for its slowest
# thread. When another process keeps a core busy, one of our threads is descheduled for a whole OS
# time slice at a time and every region waits for it: measured here, a micro@16 step ran 5.8x slower
# beside a second 2-thread job, while with one thread each the two jobs share the cores at close to
# a fair 2x. FairShare watches how much CPU the rest of the machine uses and sets our thread count
# to the cores left over (at least one, at most what we started with), and back up when they free.

def _usable_cpus() -> set[int]:
    return set(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))


def _cpu_jiffies(cpus: set[int]) -> int | None:
    """CPU time the given CPUs spent running processes since boot, in clock ticks, from /proc/stat
    (None off Linux). Fields of a cpuN line: user nice system idle iowait irq softirq steal ...;
    steal (a hypervisor running another machine) is no process of this one, and is left out."""
    busy = 0
    try:
        with open("/proc/stat") as f:
            for line in f:
                name, *fields = line.split()
                if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
                    user, nice, system, _idle, _iowait, irq, softirq = map(int, fields[:7])
                    busy += user + nice + system + irq + softirq
    except (OSError, ValueError):
        return None
    return busy


def _own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


class FairShare:
    """Call `update()` after each unit of work (a training step, a batch of features). Every
    `interval` seconds it measures the cores used by other processes,

        others = (machine busy time - this process's CPU time) / wall time        (in cores)
        threads = clamp(round(cores - others), 1, max_threads)

    and sets numba's and OpenBLAS's thread counts to it if that changed (returned then, else None).
    Off Linux, or with max_threads 1, it does nothing."""

    def __init__(self, max_threads: int | None = None, interval: float = 3.0, cores: int | None = None):
        import numba
        self.max_threads = max_threads or numba.get_num_threads()
        self.cpus = _usable_cpus()
        self.cores = cores or len(self.cpus)
        self.interval, self.threads, self.others_cores = interval, self.max_threads, 0.0
        self._tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self._last = self._sample()

    def _sample(self):
        busy = _cpu_jiffies(self.cpus)
        return None if busy is None else (time.monotonic(), busy, _own_cpu_seconds())

    def others(self, before, after) -> float:
        """Cores the other processes kept busy between two samples."""
        wall = after[0] - before[0]
        machine_busy = (after[1] - before[1]) / self._tick
        ours = after[2] - before[2]
        return max(0.0, (machine_busy - ours) / wall)

    def update(self) -> int | None:
        if self._last is None or self.max_threads <= 1 or time.monotonic() - self._last[0] < self.interval:
            return None
        now = self._sample()
        self.others_cores, self._last = self.others(self._last, now), now
        target = max(1, min(self.max_threads, int(round(self.cores - self.others_cores))))
        if target == self.threads:
            return None
        set_threads(target)
        self.threads = target
        return target

    def reset(self) -> None:
        """Back to max_threads (before work whose rounding depends on the BLAS thread count)."""
        if self.threads != self.max_threads:
            set_threads(self.max_threads)
            self.threads = self.max_threads

    def describe(self) -> str:
        if self.threads < self.max_threads:
            return (f"other processes keep {self.others_cores:.1f} of {self.cores} cores busy: {self.threads} "
                    f"thread(s) now, back to {self.max_threads} when they finish (--threads fixes the count)")
        return f"the cores are free again: {self.threads} threads"


@contextmanager
def kernels_on_this_thread():
    """Inside: numba's kernels run on the calling thread only (numba's count is per thread, so
    nothing else changes), except inside `numba_threads`. For decoding, whose steps are a few tokens:
    its many tiny kernels (a norm or an activation of a few rows) cost less than handing work to
    other threads and back, and the few that stream megabytes (every weight matrix, the KV cache)
    run inside `numba_threads(n)` at the count the caller keeps (a decoding step: that of its KV
    cache, the count in effect when it was made), so a step uses one pool only: two pools taking
    turns on the same cores wait for each other's spinning threads, and how long they spin is fixed
    when each library loads (OPENBLAS_THREAD_TIMEOUT, OMP_WAIT_POLICY): in a script that imported
    NumPy before this package, too late for `configure`."""
    with numba_threads(1):
        yield


@contextmanager
def numba_threads(n: int):
    """Inside: numba's kernels called from this thread run on n threads (at most those numba started)."""
    import numba
    before = numba.get_num_threads()
    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    try:
        yield
    finally:
        numba.set_num_threads(before)


@functools.cache
def _kernel_blas() -> str | None:
    """The path of the OpenBLAS that numba's kernels call (kernels.gemm and np.dot inside @njit go
    through scipy.linalg.cython_blas to SciPy's own OpenBLAS), when it is a library apart from
    NumPy's (the pip wheels'); None otherwise (one shared library, or not OpenBLAS)."""
    import numpy
    import scipy.linalg.cython_blas  # noqa: F401 (loads SciPy's BLAS, which numba would load anyway)
    libraries = _openblas_libraries()
    numpy_dirs = (os.path.dirname(numpy.__file__), os.path.dirname(numpy.__file__) + ".libs")
    numpy_libs = [p for p in libraries if p.startswith(numpy_dirs)]
    others = [p for p in libraries if p not in numpy_libs and "scipy" in p]
    return others[0] if numpy_libs and len(others) == 1 else None


def serial_kernel_blas() -> bool:
    """Keep the BLAS of numba's kernels at one thread (see _kernel_blas): their GEMMs run inside
    numba's own threads, and an OpenBLAS starting threads of its own inside them oversubscribes the
    cores (measured: a layer's attention 60x slower). True when that BLAS is at one thread now, so
    the kernels may call it with products of any size; False when it cannot be told apart from
    NumPy's, whose matmuls need all the threads."""
    path = _kernel_blas()
    if path is not None:
        _set_openblas(path, 1)
    return path is not None


def set_threads(n: int) -> None:
    """Set numba's and every loaded OpenBLAS's thread count now (after NumPy has loaded)."""
    import numba
    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    set_blas_threads(n)


def current_threads() -> int:
    """The thread count this process runs its pools at now (numba's; set_threads keeps BLAS's equal)."""
    import numba
    return numba.get_num_threads()


def set_blas_threads(n: int) -> None:
    """Set the thread count of every loaded OpenBLAS now (NumPy's and SciPy's are separate
    libraries) but the kernels' own, which stays at one thread (serial_kernel_blas)."""
    for path in _openblas_libraries():
        if path != _kernel_blas():
            _set_openblas(path, n)


def _set_openblas(path: str, n: int) -> None:
    setter = _openblas_function(path, "set_num_threads")
    if setter is not None:
        setter(n)


@functools.cache
def _openblas_function(path: str, what: str):
    """An OpenBLAS library's openblas_<what> function, under whichever of its builds' names it has."""
    import ctypes
    lib = ctypes.CDLL(path)
    for name in (f"scipy_openblas_{what}64_", f"scipy_openblas_{what}", f"openblas_{what}64_", f"openblas_{what}"):
        if hasattr(lib, name):
            return getattr(lib, name)
    return None


def _openblas_libraries() -> list[str]:
    """Paths of the OpenBLAS libraries loaded in this process (NumPy's and SciPy's are separate)."""
    try:
        with open("/proc/self/maps") as f:
            return sorted({line.split()[-1] for line in f
                           if "openblas" in line.lower() and line.split()[-1].startswith("/")})
    except OSError:
        return []
