"""Downloading released weights: to ``<file>.part``, verified by SHA-256, then atomically renamed.

A cached file is trusted only after its hash matched once (a ``.sha256`` marker records size and mtime); a cached
file with a wrong hash is fetched again. When every mirror fails the error lists each URL with its reason and says
where to put the file by hand.
"""

from __future__ import annotations

import hashlib
import logging
import os
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from cn_clip.errors import DownloadError

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


def is_verified(path: Path, sha256: str) -> bool:
    """True if ``path`` has the expected hash (cheaply, via the marker, when it is up to date)."""
    if not path.is_file():
        return False
    marker = _marker(path)
    if marker.is_file() and marker.read_text(encoding="utf-8") == _marker_text(path, sha256):
        return True
    if sha256_of(path) != sha256:
        return False
    marker.write_text(_marker_text(path, sha256), encoding="utf-8")
    return True


def _fetch(url: str, part: Path, timeout_s: float, expected_size: int | None) -> None:
    from tqdm import tqdm

    request = urllib.request.Request(url, headers={"User-Agent": "cn_clip"})
    with urllib.request.urlopen(request, timeout=timeout_s) as response, open(part, "wb") as out:
        total = int(response.headers.get("Content-Length") or 0) or expected_size
        with tqdm(total=total, unit="B", unit_scale=True, desc=part.name.removesuffix(".part")) as bar:
            while chunk := response.read(_CHUNK):
                out.write(chunk)
                bar.update(len(chunk))
        out.flush()
        os.fsync(out.fileno())


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
    if target.exists():
        _logger.warning("%s has a wrong SHA-256 (corrupt or partial); downloading it again", target)
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    failures = []
    for url in urls:
        _logger.info("Downloading %s to %s", url, target)
        try:
            _fetch(url, part, timeout_s, expected_size)
        except (urllib.error.URLError, OSError, TimeoutError) as exc:
            failures.append(f"{url}: {getattr(exc, 'reason', exc)}")
            part.unlink(missing_ok=True)
            continue
        got = sha256_of(part)
        if got != sha256:
            failures.append(f"{url}: SHA-256 {got} does not match the expected {sha256}")
            part.unlink(missing_ok=True)
            continue
        os.replace(part, target)
        _marker(target).write_text(_marker_text(target, sha256), encoding="utf-8")
        return target
    raise DownloadError(
        "could not download "
        + target.name
        + ":\n  "
        + "\n  ".join(failures)
        + f"\nDownload it by hand from {urls[0]} and place it at {target} (SHA-256 {sha256})."
    )
