"""§3.1 Fetching the official dataset archives (`--download`).

Downloads with urllib into <data_dir>/<archive>.part, resuming a partial file with an HTTP Range
request when the server allows it (starting over when it does not), checks the archive's MD5 against
the dataset authors' published checksum, renames it into place and extracts it beside itself
(refusing members that would land outside data_dir). Without a network it fails with one line that
says where to put the files by hand.
"""
from __future__ import annotations

import os
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

from .data import BINARY, DataError
from .files import file_digest

# name: (official URL, MD5 the authors publish)
ARCHIVES = {
    "cifar10": ("https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
                "c32a1d4ab5d03f1284b67883e8d87530"),
    "cifar100": ("https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz",
                 "03b5dce01913d631647c71ecec9e9cb8"),
    "stl10": ("http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz",
              "91f7769df0f17e558f3565bffb0c7dfb"),
}
CHUNK = 1 << 20


def _fetch(url: str, part: Path, timeout: float) -> None:
    """Append the rest of `url` to `part` (or start over if the server ignores the Range)."""
    start = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={start}-"} if start else {})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        resumed = start > 0 and getattr(response, "status", None) == 206
        if not resumed:
            start = 0
        length = response.headers.get("Content-Length")
        total = start + int(length) if length is not None else None
        flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | (os.O_APPEND if resumed else os.O_TRUNC)
        with os.fdopen(os.open(part, flags, 0o666), "ab" if resumed else "wb") as f, \
                tqdm(total=total, initial=start, unit="B", unit_scale=True, desc=part.name[:-5]) as bar:
            for block in iter(lambda: response.read(CHUNK), b""):
                f.write(block)
                bar.update(len(block))


def _extract(archive: Path, dest: Path) -> None:
    dest = dest.resolve()
    with tarfile.open(archive, "r:gz") as tar:
        members = tar.getmembers()
        for m in members:
            target = (dest / m.name).resolve()
            if dest not in target.parents and target != dest or m.issym() or m.islnk():
                raise DataError(f"{archive} holds an unsafe member {m.name!r}; not extracting it")
        tar.extractall(dest, members=members)


def download(name: str, data_dir, url: str | None = None, md5: str | None = None,
             timeout: float = 60.0) -> Path:
    """Fetch, verify and extract dataset `name` into data_dir; returns the archive path. `url` and
    `md5` override the official ones (tests serve local files)."""
    if name not in ARCHIVES:
        raise DataError(f"--download knows {', '.join(ARCHIVES)}, not '{name}'")
    official_url, official_md5 = ARCHIVES[name]
    url, md5 = url or official_url, md5 or official_md5
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    folder, archive_name = BINARY[name][:2]
    archive = data_dir / archive_name
    if not (archive.is_file() and file_digest(archive, "md5") == md5):
        part = data_dir / (archive_name + ".part")
        try:
            _fetch(url, part, timeout)
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise DataError(f"could not download {url} ({reason}); fetch it on a machine with a network "
                            f"and put {archive_name} (or the extracted {folder}/) in {data_dir}") from None
        got = file_digest(part, "md5")
        if got != md5:
            part.unlink()
            raise DataError(f"{url} arrived with MD5 {got}, expected {md5}: the download is corrupt; "
                            "run again with --download")
        part.replace(archive)
    if not (data_dir / folder).is_dir():
        try:
            _extract(archive, data_dir)
        except (tarfile.TarError, OSError, EOFError) as e:
            raise DataError(f"cannot extract {archive} ({e}): delete it and download again") from None
    return archive
