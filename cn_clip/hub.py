"""Downloading released weights: streamed to a per-process temp file, verified by SHA-256, then atomically renamed.

Several processes may share one cache (ranks of a job, or separate jobs): a file lock beside the target lets one
download while the others wait and then find the verified file. A cached file is trusted only after its hash
matched once (a ``.sha256`` marker, itself written atomically, records size and mtime); a cached file with a wrong
hash is fetched again. When every mirror fails the error lists each URL with its reason and says where to put the
file by hand.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO

from cn_clip.errors import DownloadError
from cn_clip.fileio import atomic_write

_logger = logging.getLogger(__name__)
DEFAULT_CACHE = "~/.cache/clip"
_CHUNK = 1 << 20


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _marker(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _marker_text(path: Path, sha256: str) -> str:
    stat = path.stat()
    return f"{sha256} {stat.st_size} {stat.st_mtime_ns}\n"


def _write_marker(path: Path, sha256: str) -> None:
    with atomic_write(_marker(path)) as handle:
        handle.write(_marker_text(path, sha256))


def is_verified(path: Path, sha256: str) -> bool:
    """True if ``path`` has the expected hash (cheaply, via the marker, when it is up to date)."""
    if not path.is_file():
        return False
    marker = _marker(path)
    if marker.is_file() and marker.read_text(encoding="utf-8") == _marker_text(path, sha256):
        return True
    if sha256_of(path) != sha256:
        return False
    _write_marker(path, sha256)
    return True


@contextlib.contextmanager
def _cache_lock(target: Path) -> Iterator[None]:
    """Hold ``<target>.lock`` (an OS file lock, released if the holder dies)."""
    from filelock import FileLock, Timeout

    lock = FileLock(str(target.with_name(target.name + ".lock")))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        _logger.info("Waiting for another process that is downloading %s", target)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _fetch(url: str, out: IO[bytes], name: str, timeout_s: float, expected_size: int | None) -> str:
    """Stream ``url`` into ``out``; return the SHA-256 of what was written."""
    from tqdm import tqdm

    digest = hashlib.sha256()
    request = urllib.request.Request(url, headers={"User-Agent": "cn_clip"})
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        total = int(response.headers.get("Content-Length") or 0) or expected_size
        with tqdm(total=total, unit="B", unit_scale=True, desc=name) as bar:
            while chunk := response.read(_CHUNK):
                out.write(chunk)
                digest.update(chunk)
                bar.update(len(chunk))
    return digest.hexdigest()


class _HashMismatch(Exception):
    pass


def _try_mirror(url: str, target: Path, sha256: str, timeout_s: float, expected_size: int | None) -> None:
    """Download ``url`` to a temp sibling of ``target`` and rename it into place only if the hash matches."""
    with atomic_write(target, "wb") as out:
        got = _fetch(url, out, target.name, timeout_s, expected_size)
        if got != sha256:
            raise _HashMismatch(f"SHA-256 {got} does not match the expected {sha256}")
    _write_marker(target, sha256)


def download(
    urls: Sequence[str],
    target: str | Path,
    sha256: str,
    expected_size: int | None = None,
    timeout_s: float = 30.0,
) -> Path:
    """Return ``target``, downloading it from the first working mirror in ``urls`` if it is absent or corrupt."""
    target = Path(target).expanduser()
    if target.exists() and not target.is_file():
        raise DownloadError(f"{target} exists and is not a regular file")
    if is_verified(target, sha256):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _cache_lock(target):
        if is_verified(target, sha256):  # another process finished it while we waited
            return target
        if target.exists():
            _logger.warning("%s has a wrong SHA-256 (corrupt or partial); downloading it again", target)
        failures = []
        for url in urls:
            _logger.info("Downloading %s to %s", url, target)
            try:
                _try_mirror(url, target, sha256, timeout_s, expected_size)
            except _HashMismatch as exc:
                failures.append(f"{url}: {exc}")
            except (urllib.error.URLError, OSError, TimeoutError) as exc:
                failures.append(f"{url}: {getattr(exc, 'reason', exc)}")
            else:
                return target
    raise DownloadError(
        "could not download "
        + target.name
        + ":\n  "
        + "\n  ".join(failures)
        + f"\nDownload it by hand from {urls[0]} and place it at {target} (SHA-256 {sha256})."
    )
