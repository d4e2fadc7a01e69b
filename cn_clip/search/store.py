"""The index directory: a versioned, atomically updated set of files, read memory-mapped.

Layout (generation 0 after ``index``; each ``add``/``remove`` writes generation ``g + 1``)::

    meta.json             the switch: names the files of the current generation, plus architecture, checkpoint,
                          index type, recall@10, counts, sources, build time
    index[.g].faiss       FAISS index, label i = row i (see cn_clip.search.ann)
    ids[.g].json          [id, ...]: LMDB image ids (int or str) or, for folders, paths relative to the folder
    locations[.g].json    [[source number, key], ...]: where row i's image is read from; the key is an LMDB key
                          (kind lmdb), a relative path (folder), an image path or URL (files: a CSV/JSONL list)
                          or "shard number:byte offset:size" (shards, whose URLs the source lists)
    vectors[.g].npy       [N, D] float32 L2-normalised features (exact rows for "similar images" and rebuilds)

An update writes the new generation's files beside the old ones, then replaces ``meta.json`` atomically. A reader
(the running server included) reads ``meta.json`` once and then opens the files it names, so it sees the old
generation or the new one, never a mix; a killed update leaves ``meta.json`` naming the old files. The generation
before the current one is kept for readers that are still opening it; older ones and orphans of killed updates
are deleted by the next update. Updates take ``.lock`` (filelock), so two writers queue. Format 1 indexes (one flat
``index.faiss`` with ``ids.json``/``paths.json``) are read as they are and converted by their first update.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cn_clip.errors import ConfigError, DataError
from cn_clip.extras import require
from cn_clip.fileio import atomic_write
from cn_clip.search import ann

_logger = logging.getLogger(__name__)

FORMAT_VERSION = 2
META_FILE = "meta.json"
LOCK_FILE = ".lock"
KINDS = ("index", "ids", "locations", "vectors")
_SUFFIX = {"index": ".faiss", "ids": ".json", "locations": ".json", "vectors": ".npy"}


def file_names(generation: int) -> dict[str, str]:
    tag = "" if generation == 0 else f".{generation}"
    return {kind: f"{kind}{tag}{_SUFFIX[kind]}" for kind in KINDS}


@dataclass
class Gallery:
    """One generation of an index directory, as loaded (``vectors`` is a read-only memory map when on disk)."""

    directory: Path
    meta: dict[str, Any]
    index: Any
    ids: list[Any]
    locations: list[list[Any]]
    vectors: np.ndarray
    row_of: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.row_of = {str(item): row for row, item in enumerate(self.ids)}
        if not len(self.ids) == len(self.locations) == self.index.ntotal == len(self.vectors):
            raise DataError(
                f"{self.directory}: {self.index.ntotal} vectors, {len(self.ids)} ids, {len(self.locations)} locations"
                f" and {len(self.vectors)} feature rows disagree (damaged index)"
            )

    @property
    def generation(self) -> int:
        return int(self.meta.get("generation", 0))

    def source_of(self, row: int) -> tuple[dict[str, str], str]:
        number, key = self.locations[row]
        return self.meta["sources"][number], key

    def path_of(self, row: int) -> str | None:
        """The image file (absolute) or URL of a folder or file-list row, None for an LMDB or shard row."""
        source, key = self.source_of(row)
        if source["kind"] == "folder":
            return str(Path(source["path"]) / key)
        return key if source["kind"] == "files" else None


def read_meta(directory: str | os.PathLike) -> dict[str, Any]:
    path = Path(directory) / META_FILE
    if not path.is_file():
        raise DataError(f"{directory}: not a search index ({META_FILE} missing; build one with 'index')")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def _format1(directory: Path, meta: dict[str, Any]) -> tuple[dict[str, Any], list[list[Any]]]:
    """Format 1 (flat index.faiss + ids.json [+ paths.json]) as format 2 metadata and locations, in memory. Its
    LMDB ids and folder ids are the LMDB keys and relative paths."""
    ids = _read_json(directory / "ids.json")
    meta = {**meta, "files": {"index": "index.faiss", "ids": "ids.json"}, "index_type": "flat", "generation": 0}
    meta["sources"] = [{"kind": meta.get("source_kind", "lmdb"), "path": meta["source"]}]
    return meta, [[0, str(item)] for item in ids]


def load(directory: str | os.PathLike, mmap: bool = True) -> Gallery:
    """The current generation of ``directory``. ``mmap``: FAISS and the feature rows are memory-mapped where the
    index type allows, so N readers share the page cache; updates load with ``mmap=False``."""
    directory = Path(directory)
    for attempt in range(3):  # a generation removed between reading meta.json and opening its files: read again
        meta = read_meta(directory)
        try:
            return _load_generation(directory, meta, mmap)
        except FileNotFoundError as exc:
            if attempt == 2:
                raise DataError(f"{directory}: {Path(exc.filename).name} missing (damaged index)") from None
            time.sleep(0.05)
    raise AssertionError("unreachable")


def _load_generation(directory: Path, meta: dict[str, Any], mmap: bool) -> Gallery:
    faiss = require("faiss", "search indexes")

    if meta.get("format", 1) > FORMAT_VERSION:
        raise DataError(f"{directory}: index format {meta['format']} is newer than this cn_clip reads")
    if "files" not in meta:
        meta, locations = _format1(directory, meta)
    else:
        locations = _read_json(directory / meta["files"]["locations"])
    files = meta["files"]
    index_path = directory / files["index"]
    if not index_path.is_file():
        raise FileNotFoundError(2, "missing", str(index_path))
    # IO_FLAG_MMAP_IFC maps the stored codes of every type here (flat rows, HNSW storage, IVF lists, PQ/SQ codes);
    # IO_FLAG_MMAP alone still copies flat codes into RAM (measured with faiss-cpu 1.15).
    flags = faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY if mmap else 0
    index = faiss.read_index(str(index_path), flags)
    ann.apply_params(index, meta.get("params", {}))
    ids = _read_json(directory / files["ids"])
    if "vectors" in files:
        vectors = np.load(directory / files["vectors"], mmap_mode="r" if mmap else None)
    else:  # format 1: the flat index holds the exact rows
        vectors = index.reconstruct_n(0, index.ntotal) if index.ntotal else np.zeros((0, index.d), np.float32)
    return Gallery(directory, meta, index, ids, locations, vectors)


# -------------------------------------------------------------------------------------------------- writing
def _lock(directory: Path) -> Any:
    from filelock import FileLock

    return FileLock(str(directory / LOCK_FILE))


def write_generation(
    directory: Path,
    meta: dict[str, Any],
    index: Any,
    ids: Sequence[Any],
    locations: Sequence[Sequence[Any]],
    vectors: np.ndarray,
) -> dict[str, Any]:
    """Write generation ``meta['generation']`` beside the current one, then switch ``meta.json`` to it."""
    faiss = require("faiss", "search indexes")

    names = file_names(int(meta["generation"]))
    meta = {**meta, "format": FORMAT_VERSION, "files": names, "count": int(index.ntotal), "dim": int(index.d)}
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_write(directory / names["index"], "wb") as handle:
        handle.write(faiss.serialize_index(index).tobytes())
    with atomic_write(directory / names["ids"]) as handle:
        json.dump(list(ids), handle, ensure_ascii=False)
    with atomic_write(directory / names["locations"]) as handle:
        json.dump([list(loc) for loc in locations], handle, ensure_ascii=False)
    with atomic_write(directory / names["vectors"], "wb") as handle:
        np.save(handle, np.ascontiguousarray(vectors, dtype=np.float32))
    _switch(directory, meta)
    _delete_stale(directory, keep=(meta["generation"], meta["generation"] - 1))
    return meta


def _switch(directory: Path, meta: dict[str, Any]) -> None:
    with atomic_write(directory / META_FILE) as handle:
        json.dump(meta, handle, ensure_ascii=False, indent=1)


def _generation_of(name: str) -> int | None:
    """Generation of a data file name (``ids.json`` → 0, ``ids.3.json`` → 3), None for other files."""
    for kind in (*KINDS, "paths"):
        if name.startswith(kind + "."):
            middle = name[len(kind) + 1 :].split(".")
            return 0 if len(middle) == 1 else int(middle[0]) if middle[0].isdigit() else None
    return None


def _delete_stale(directory: Path, keep: Iterable[int]) -> None:
    keep = set(keep)
    for path in directory.iterdir():
        generation = _generation_of(path.name)
        stale = generation is not None and generation not in keep
        killed = path.name.startswith(".") and path.name.endswith(".tmp")  # a killed update's temp file
        if path.is_file() and (stale or killed):
            path.unlink(missing_ok=True)


def create(
    directory: str | os.PathLike,
    matrix: np.ndarray,
    ids: Sequence[Any],
    locations: Sequence[Sequence[Any]],
    meta: dict[str, Any],
    index_type: str = "flat",
    overwrite: bool = False,
) -> dict[str, Any]:
    """Build an index of type ``index_type`` over ``matrix`` and write generation 0 of a new index directory
    (built in a temp directory and renamed, so nothing is left half-written)."""
    from cn_clip.fileio import atomic_dir

    check_unique(ids)
    index, spec, stats = ann.build_measured(index_type, matrix)
    meta = {**meta, "generation": 0, "index_type": spec.kind, "factory": spec.factory, "params": spec.params, **stats}
    with atomic_dir(directory, overwrite=overwrite) as tmp:
        meta = write_generation(tmp, meta, index, ids, locations, matrix)
    return meta


def check_unique(ids: Sequence[Any], existing: dict[str, int] | None = None) -> None:
    """Refuse ids given twice or (with ``existing``) already indexed, naming up to ten of each."""
    seen: set[str] = set()
    twice: list[str] = []
    present: list[str] = []
    for item in ids:
        key = str(item)
        if existing is not None and key in existing:
            present.append(key)
        elif key in seen:
            twice.append(key)
        seen.add(key)
    found = (("already in the index", present), ("given twice", twice))
    problems = [f"{what}: {_some(keys)}" for what, keys in found if keys]
    if problems:
        raise DataError(f"duplicate image ids refused ({'; '.join(problems)})")


def _some(keys: Sequence[str]) -> str:
    more = f" and {len(keys) - 10} more" if len(keys) > 10 else ""
    return ", ".join(repr(k) for k in keys[:10]) + more


def _updated_meta(gallery: Gallery, index: Any, vectors: np.ndarray, started: float) -> dict[str, Any]:
    meta = {**gallery.meta, "generation": gallery.generation + 1, "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    meta["update_seconds"] = round(time.perf_counter() - started, 3)
    if meta.get("index_type", "flat") != "flat" and len(vectors):
        meta["recall_at_10"] = round(ann.recall_at_k(index, vectors), 4)
    return meta


def add(
    directory: str | os.PathLike,
    matrix: np.ndarray,
    ids: Sequence[Any],
    keys: Sequence[str],
    source: dict[str, str],
) -> dict[str, Any]:
    """Append rows read from ``source`` (``{"kind": "lmdb"|"folder"|"files"|"shards", "path": …}``); ids already
    present are refused, naming them."""
    directory = Path(directory)
    started = time.perf_counter()
    with _lock(directory):
        gallery = load(directory, mmap=False)
        check_unique(ids, gallery.row_of)
        if matrix.shape[1] != gallery.index.d:
            raise ConfigError(f"new features are {matrix.shape[1]}-d but {directory} holds {gallery.index.d}-d")
        sources = list(gallery.meta["sources"])
        if source not in sources:
            sources.append(source)
        number = sources.index(source)
        index = gallery.index
        ann.add_rows(index, matrix)
        vectors = np.concatenate([np.asarray(gallery.vectors, np.float32), matrix.astype(np.float32)])
        meta = {**_updated_meta(gallery, index, vectors, started), "sources": sources}
        locations = [*gallery.locations, *([number, key] for key in keys)]
        return write_generation(directory, meta, index, [*gallery.ids, *ids], locations, vectors)


def remove(directory: str | os.PathLike, ids: Sequence[str]) -> dict[str, Any]:
    """Drop the rows of ``ids`` (compared as text); unknown ids are refused, naming them. The index is refilled from
    the stored features without retraining (an HNSW graph cannot delete rows in place)."""
    directory = Path(directory)
    started = time.perf_counter()
    with _lock(directory):
        gallery = load(directory, mmap=False)
        unknown = [item for item in ids if str(item) not in gallery.row_of]
        if unknown:
            raise DataError(f"ids not in {directory}: {', '.join(repr(u) for u in unknown[:10])}")
        drop = {gallery.row_of[str(item)] for item in ids}
        keep = np.array([row for row in range(len(gallery.ids)) if row not in drop], dtype=np.int64)
        vectors = np.asarray(gallery.vectors, np.float32)[keep]
        index = _emptied(gallery)
        ann.add_rows(index, vectors)
        ann.apply_params(index, gallery.meta.get("params", {}))
        meta = _updated_meta(gallery, index, vectors, started)
        ids_kept = [gallery.ids[row] for row in keep]
        locations = [gallery.locations[row] for row in keep]
        return write_generation(directory, meta, index, ids_kept, locations, vectors)


def _emptied(gallery: Gallery) -> Any:
    """An empty index with the gallery's trained structure (IVF centroids, PQ codebooks) kept."""
    faiss = require("faiss", "search indexes")

    if gallery.meta.get("index_type", "flat") in ("ivf", "ivfpq"):
        index = faiss.clone_index(gallery.index)
        index.reset()
        return index
    spec = ann.IndexSpec(gallery.meta.get("index_type", "flat"), gallery.meta.get("factory", "Flat"), {})
    return ann.new_index(spec, gallery.index.d)
