"""File helpers: atomic writes, file digests, and array caches that check their own contents.

Not a paper section. The bottom layer of the package: of minigpt_img it imports only the errors, so the data
code, the checkpoints and the probes can all use it without pulling in the model.

    write_atomic(path, write)     temp file beside path, fsync, rename: readers see old or new, never half
    write_json(path, obj)         a report (probe.json, finetune.json ...) through write_atomic
    file_digest(path)             hex digest of a file's bytes (sha256 by default, md5 for official archives)
    cached_array(path, compute)   path's array if its recorded sha256 matches, else compute() and store it
    FolderLock(folder)            one live process per run folder (a killed holder frees it)
    check_writable(folder, flag)  fail before the work, not at its first save
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from .errors import FolderBusy, WriteError

TEMP_SUFFIX = ".tmp"  # write_atomic's temporary files: <name>.<random>.tmp beside <name>


def write_atomic(path, write) -> None:
    """Call write(f) on a temporary file beside `path`, flush it to disk, then rename it over `path`:
    readers see the old file or the new one, never half of one, whatever interrupts the write. An
    OSError (no space, no permission) removes the temporary file and raises WriteError naming path.
    A path that is a symbolic link is refused: nothing is written where a link points."""
    path = Path(path)
    if path.is_symlink():
        raise WriteError(f"{path} is a symbolic link: refusing to write through it (it may point outside the "
                         "folders you chose); remove the link, or choose another path")
    try:
        _write_atomic(path, write)
    except OSError as e:
        raise WriteError(f"cannot write {path} ({e.strerror or e}); any earlier {path.name} is intact: "
                         "free disk space or choose a writable folder") from None


def _write_atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        # mkstemp makes the file private (0600); give it the mode open() would: 0666 minus the umask
        # (which can only be read by setting it, so it is set back at once)
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def open_append(path):
    """path opened for appending lines (metrics.jsonl), never through a symbolic link."""
    try:
        return os.fdopen(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o666), "a")
    except OSError as e:
        raise WriteError(f"cannot append to {path} ({e.strerror}): remove it if it is a link, or choose "
                         "another --out") from None


def write_json(path, obj) -> None:
    """obj as indented JSON at path, written atomically (write_atomic)."""
    write_atomic(path, lambda f: f.write(json.dumps(obj, indent=2).encode()))


def check_writable(folder, flag: str) -> None:
    """Create `folder` if needed and prove a file can be written in it, or raise WriteError naming
    the flag that chose it: found before a run spends time on data, not at its first checkpoint."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-check.", suffix=TEMP_SUFFIX, dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise WriteError(f"cannot write in {folder} ({e.strerror or e}): choose a writable {flag}") from None



class FolderLock:
    """An exclusive lock on a folder for one process: fcntl.flock on <folder>/.lock, which records
    the holder's PID. The kernel releases a flock when its process dies, however it dies, so a lock
    left by a killed run is simply free to take."""

    def __init__(self, folder):
        self.path = Path(folder) / ".lock"
        self._fd = None

    def acquire(self) -> None:
        import fcntl
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
        except OSError as e:  # ELOOP: the lock is a symbolic link, never followed
            raise WriteError(f"cannot use {self.path} as the folder's lock ({e.strerror}): remove it") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise FolderBusy(f"{self.path.parent} is in use by another run (process {holder}, lock "
                             f"{self.path}): wait for it to finish, or choose another folder") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None


def remove_stale_temps(folder) -> list:
    """Delete write_atomic's temporary files left in `folder` (not below it) by a killed writer.
    Only for a folder no other live process writes to (a locked run folder)."""
    removed = []
    for p in Path(folder).glob(f"*.*{TEMP_SUFFIX}"):
        if p.is_file():
            p.unlink()
            removed.append(p)
    return removed


def file_digest(path, algorithm: str = "sha256", chunk: int = 1 << 22) -> str:
    """Hex digest of the file's bytes, read in chunks (archives of gigabytes stay out of memory)."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def array_digest(array: np.ndarray) -> str:
    """sha256 of an array's bytes in C order."""
    return hashlib.sha256(np.ascontiguousarray(array).data).hexdigest()


def cached_array(path, compute, shape=None, dtype=None) -> np.ndarray:
    """The array stored at `path` (.npy) when it is intact, else compute() stored there.

    Intact means: the file loads without pickle, its sha256 equals the one recorded beside it in
    `path.sha256` when it was written, and it has the expected shape and dtype (when given). Anything
    else (a stale, truncated or damaged file, or a missing digest) is recomputed and overwritten.
    The digest sits beside what it guards: it catches accidents (a torn write, a flipped bit, a file
    from another run), not someone who edits both; a cache folder is trusted as the user's own."""
    array = load_cached(path, shape, dtype)
    if array is None:
        array = compute()
        store_cached(path, array)
    return array


def load_cached(path, shape=None, dtype=None) -> np.ndarray | None:
    """The intact array at `path` (see cached_array), or None."""
    path = Path(path)
    digest_path = path.with_name(path.name + ".sha256")
    if not (path.is_file() and digest_path.is_file()):
        return None
    try:
        array = np.load(path, allow_pickle=False)
        if ((shape is None or array.shape == tuple(shape)) and (dtype is None or array.dtype == dtype)
                and array_digest(array) == digest_path.read_text().strip()):
            return array
    except (OSError, ValueError):
        pass  # damaged: the caller rebuilds it
    return None


def store_cached(path, array: np.ndarray) -> None:
    """Write array to `path` and its sha256 beside it, each atomically."""
    path = Path(path)
    write_atomic(path, lambda f: np.save(f, array, allow_pickle=False))
    write_atomic(path.with_name(path.name + ".sha256"), lambda f: f.write(array_digest(array).encode()))
