"""Reading and writing feature files: the reference's JSONL lines and cn_clip's ``.npy`` + ``.ids.json`` pair.

JSONL (the reference format, one object per line)::

    {"image_id": 1000002, "feature": [0.0123, -0.0456, ...]}

``.npy`` (cn_clip's format for large galleries; memory-mapped on read)::

    feats.npy       np.save of a C-contiguous [N, D] float32 or float16 matrix, row i = item i
    feats.ids.json  {"id_key": "image_id", "ids": [1000002, 1000005, ...]}   (N ids, int or str, same order)

Ids keep their JSON type (int or str). Feature values are parsed exactly as the reference does (JSON number →
Python float → float32), so scores computed from either format agree bit for bit.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cn_clip.errors import DataError
from cn_clip.fileio import atomic_write

_logger = logging.getLogger(__name__)

FeatureId = int | str
_LINES_PER_BLOCK = 4096

try:  # orjson parses the float-heavy feature lines ~4x faster than the standard library.
    import orjson as _orjson

    _loads = _orjson.loads
    _JSON_ERRORS: tuple[type[Exception], ...] = (_orjson.JSONDecodeError, ValueError)
except ImportError:  # pragma: no cover - orjson is a declared dependency; stay usable without it
    _loads = json.loads
    _JSON_ERRORS = (ValueError,)


@dataclass
class Features:
    """Ids and their L2-normalised feature rows (``matrix[i]`` belongs to ``ids[i]``)."""

    ids: list[FeatureId]
    matrix: np.ndarray  # [N, D] float32 (or a float16 memory map from .npy)
    id_key: str
    path: str = ""

    def __len__(self) -> int:
        return len(self.ids)


def ids_path_for(npy_path: str | os.PathLike) -> Path:
    """``feats.npy`` → ``feats.ids.json``."""
    path = Path(npy_path)
    return path.with_name(path.name.removesuffix(".npy") + ".ids.json")


def read_features(path: str | os.PathLike, id_key: str) -> Features:
    """Read a feature file (``.npy`` pair or reference JSONL) whose lines carry ``id_key`` and ``feature``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"feature file not found: {path}")
    features = _read_npy(path, id_key) if path.suffix == ".npy" else _read_jsonl(path, id_key)
    _check_finite(features)
    _logger.info("read %d %s features of dim %d from %s", len(features), id_key, features.matrix.shape[1], path)
    return features


def _check_id(value: Any, where: str, id_key: str) -> FeatureId:
    if isinstance(value, int | str):
        return value
    raise DataError(f"{where}: {id_key} must be an integer or a string, got {value!r}")


def _read_jsonl(path: Path, id_key: str) -> Features:
    ids: list[FeatureId] = []
    blocks: list[np.ndarray] = []
    dim: int | None = None
    for first_lineno, lines in _line_blocks(path):
        rows = []
        for offset, line in enumerate(lines):
            where = f"{path}:{first_lineno + offset}"
            obj = _parse_line(line, where)
            if not isinstance(obj, dict) or id_key not in obj or "feature" not in obj:
                raise DataError(f"{where}: expected an object with keys '{id_key}' and 'feature'")
            ids.append(_check_id(obj[id_key], where, id_key))
            rows.append(obj["feature"])
        block = _to_matrix(rows, path, first_lineno, lines)
        if dim is not None and block.shape[1] != dim:
            raise DataError(f"{path}:{first_lineno}: feature dimension {block.shape[1]} differs from {dim} above")
        dim = block.shape[1]
        blocks.append(block)
    if not ids:
        raise DataError(f"{path}: no features (empty file)")
    matrix = blocks[0] if len(blocks) == 1 else np.concatenate(blocks)
    return Features(ids=ids, matrix=matrix, id_key=id_key, path=str(path))


def _line_blocks(path: Path) -> Iterator[tuple[int, list[bytes]]]:
    """Yield (first line number, non-blank lines) in blocks, so memory stays bounded by the block size."""
    with open(path, "rb") as handle:
        lineno = 0
        while True:
            raw = handle.readlines(1 << 24)
            if not raw:
                return
            block: list[bytes] = []
            start = lineno + 1
            for line in raw:
                lineno += 1
                if line.strip():
                    block.append(line)
                elif block:  # keep line numbers exact: a blank line splits the block
                    yield start, block
                    block, start = [], lineno + 1
                else:
                    start = lineno + 1
            if block:
                yield start, block


def _parse_line(line: bytes, where: str) -> Any:
    try:
        return _loads(line)
    except _JSON_ERRORS as exc:
        raise DataError(f"{where}: not a JSON object: {exc}") from None


def _to_matrix(rows: list, path: Path, first_lineno: int, lines: Sequence[bytes]) -> np.ndarray:
    try:
        with np.errstate(over="ignore"):  # values beyond float32 become inf and are reported by _check_finite
            matrix = np.array(rows, dtype=np.float32)  # Python float → float32, exactly as the reference
    except (ValueError, TypeError):
        matrix = None
    if matrix is None or matrix.ndim != 2 or matrix.shape[1] == 0:
        for offset, row in enumerate(rows):
            if not isinstance(row, list) or not row or len(row) != len(rows[0]):
                raise DataError(
                    f"{path}:{first_lineno + offset}: 'feature' must be a non-empty list of numbers "
                    f"of the same length as on line {first_lineno}"
                )
        raise DataError(f"{path}:{first_lineno}: 'feature' values must be numbers")
    return matrix


def _read_npy(path: Path, id_key: str) -> Features:
    ids_path = ids_path_for(path)
    if not ids_path.is_file():
        raise DataError(f"{path}: the id file {ids_path} is missing (see docs/eval.md, feature files)")
    meta = json.loads(ids_path.read_text(encoding="utf-8"))
    if not isinstance(meta, dict) or not isinstance(meta.get("ids"), list):
        raise DataError(f'{ids_path}: expected {{"id_key": ..., "ids": [...]}}')
    if meta.get("id_key", id_key) != id_key:
        raise DataError(f"{ids_path}: holds {meta['id_key']} features, expected {id_key}")
    ids = [_check_id(value, f"{ids_path}: ids[{i}]", id_key) for i, value in enumerate(meta["ids"])]
    matrix = np.load(path, mmap_mode="r")
    if matrix.ndim != 2 or matrix.dtype not in (np.float32, np.float16):
        raise DataError(f"{path}: expected a [N, D] float32/float16 matrix, got {matrix.dtype} {matrix.shape}")
    if matrix.shape[0] != len(ids):
        raise DataError(f"{path}: {matrix.shape[0]} rows but {len(ids)} ids in {ids_path}")
    return Features(ids=ids, matrix=matrix, id_key=id_key, path=str(path))


def _check_finite(features: Features, chunk_rows: int = 65536) -> None:
    matrix = features.matrix
    for start in range(0, matrix.shape[0], chunk_rows):
        finite = np.isfinite(matrix[start : start + chunk_rows]).all(axis=1)
        if not finite.all():
            bad = start + int(np.argmin(finite))
            raise DataError(
                f"{features.path}: the feature of {features.id_key} {features.ids[bad]!r} contains NaN or infinity"
            )


def write_features_jsonl(path: str | os.PathLike, ids: Sequence[FeatureId], matrix: np.ndarray, id_key: str) -> None:
    """Write reference-format lines ``{"<id_key>": id, "feature": [...]}`` (full float repr), atomically."""
    if len(ids) != len(matrix):
        raise ValueError(f"{len(ids)} ids but {len(matrix)} feature rows")
    with atomic_write(path) as handle:
        for item_id, row in zip(ids, np.asarray(matrix, dtype=np.float32).tolist(), strict=True):
            handle.write(json.dumps({id_key: item_id, "feature": row}) + "\n")


def write_features_npy(
    path: str | os.PathLike, ids: Sequence[FeatureId], matrix: np.ndarray, id_key: str, dtype: str = "float32"
) -> None:
    """Write ``path`` (.npy matrix) and its ``.ids.json`` sidecar, each atomically (ids last)."""
    path = Path(path)
    if path.suffix != ".npy":
        raise ValueError(f"{path}: npy feature files must end in .npy")
    if len(ids) != len(matrix):
        raise ValueError(f"{len(ids)} ids but {len(matrix)} feature rows")
    with atomic_write(path, "wb") as handle:
        np.save(handle, np.ascontiguousarray(matrix, dtype=np.dtype(dtype)))
    with atomic_write(ids_path_for(path)) as handle:
        json.dump({"id_key": id_key, "ids": list(ids)}, handle, ensure_ascii=False)


def read_feature_files(
    requests: Sequence[tuple[str | os.PathLike, str]], parallel: bool | None = None
) -> list[Features]:
    """``read_features`` for several (path, id_key) pairs; large JSONL files are parsed in parallel processes.

    JSON parsing holds the GIL, so threads would not help; forked workers return the parsed matrices. Used only on
    Linux (fork is safe there for this numpy-only work) with more than one CPU and ≥ 8 MiB of JSONL in total.
    """
    if parallel is None:
        sizes = [Path(p).stat().st_size if Path(p).is_file() and Path(p).suffix != ".npy" else 0 for p, _ in requests]
        parallel = len(requests) > 1 and sum(sizes) >= 8 << 20 and (os.cpu_count() or 1) > 1 and os.name == "posix"
        parallel = parallel and sys.platform.startswith("linux")
    if not parallel:
        return [read_features(path, key) for path, key in requests]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(len(requests) - 1, mp_context=multiprocessing.get_context("fork")) as pool:
        futures = [pool.submit(read_features, path, key) for path, key in requests[1:]]
        first = read_features(*requests[0])  # the parent parses one file meanwhile
        return [first, *(future.result() for future in futures)]
