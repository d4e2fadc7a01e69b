"""FAISS index types for search: exact ``flat`` and the approximate ``ivf``, ``hnsw`` and ``ivfpq``.

Every type scores by inner product of L2-normalised rows (= cosine). An approximate index is measured when it is
built: :func:`recall_at_k` compares its top-10 with exact search for a sample of the gallery's own rows, and the
figure is stored in the index metadata. Row ``i`` of the gallery is FAISS label ``i`` for every type.

=========  =========================================  =============================================
type       FAISS                                      when ``auto`` picks it
=========  =========================================  =============================================
flat       ``IndexFlatIP``                            fewer than 200,000 images
ivf        ``IVF{nlist},Flat`` (exact vectors)        —
hnsw       ``HNSW32,Flat`` (graph, 4 × d bytes + graph)  —
ivfpq      ``IVF{nlist},PQ{d/8}np,Refine(SQ8)``       200,000 images or more (about d + d/8 bytes a row)
=========  =========================================  =============================================
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from cn_clip.errors import ConfigError
from cn_clip.extras import require

_logger = logging.getLogger(__name__)

INDEX_TYPES = ("flat", "ivf", "hnsw", "ivfpq", "auto")
AUTO_FLAT_BELOW = 200_000
MAX_TRAIN_ROWS = 100_000
RECALL_QUERIES = 1000


@dataclass
class IndexSpec:
    """What was built: the type, its FAISS factory string and the search-time parameters (stored in meta.json)."""

    kind: str
    factory: str
    params: dict[str, Any]


def resolve_kind(kind: str, count: int) -> str:
    if kind not in INDEX_TYPES:
        raise ConfigError(f"unknown --index-type {kind!r}; choose from {', '.join(INDEX_TYPES)}")
    if kind == "auto":
        return "flat" if count < AUTO_FLAT_BELOW else "ivfpq"
    return kind


def make_spec(kind: str, count: int, dim: int) -> IndexSpec:
    """The FAISS layout for ``count`` rows of ``dim`` floats; inverted lists are sized to about 4·√count."""
    kind = resolve_kind(kind, count)
    nlist = max(1, min(65536, int(4 * math.sqrt(max(count, 1)))))
    nprobe = max(1, min(nlist, nlist // 16 if nlist >= 256 else nlist // 4 or 1))
    if kind == "flat":
        return IndexSpec(kind, "Flat", {})
    if kind == "ivf":
        return IndexSpec(kind, f"IVF{nlist},Flat", {"nprobe": nprobe})
    if kind == "hnsw":
        return IndexSpec(kind, "HNSW32,Flat", {"efSearch": 128})
    if dim % 8:
        raise ConfigError(f"--index-type ivfpq needs a dimension divisible by 8, got {dim}")
    bits = "" if count >= 256 * 39 else "x4"  # 8-bit codebooks want 39 training rows per centroid
    # "np": no polysemous training (it orders codes for Hamming pre-filtering, which is not used here, and it was
    # 4/5 of the build time)
    factory = f"IVF{nlist},PQ{dim // 8}{bits}np,Refine(SQ8)"
    # k_factor 32: at 1M × 512 recall@10 went 0.68 → 0.92 from k_factor 8, at the same speed (benchmarks/serve.py)
    return IndexSpec(kind, factory, {"nprobe": nprobe, "k_factor": 32})


def check_trainable(spec: IndexSpec, count: int) -> None:
    """IVF needs at least one training row per list (FAISS asks for 39); refuse too small a gallery, loudly."""
    if spec.factory.startswith("IVF"):
        nlist = int(spec.factory[3:].split(",")[0])
        if count < nlist:
            raise ConfigError(f"--index-type {spec.kind} needs at least {nlist} images to train, got {count}")


def apply_params(index: Any, params: dict[str, Any]) -> None:
    """Set search-time parameters: ``k_factor`` on the refine wrapper, ``nprobe`` on the IVF inside, ``efSearch``
    on the HNSW graph (FAISS's ParameterSpace does not reach through ``IndexRefine``)."""
    faiss = require("faiss", "search indexes")

    index = faiss.downcast_index(index)
    if "k_factor" in params and isinstance(index, faiss.IndexRefine):
        index.k_factor = float(params["k_factor"])
    if "nprobe" in params:
        faiss.extract_index_ivf(index).nprobe = int(params["nprobe"])
    if "efSearch" in params:
        faiss.downcast_index(index).hnsw.efSearch = int(params["efSearch"])


def new_index(spec: IndexSpec, dim: int) -> Any:
    faiss = require("faiss", "search indexes")

    return faiss.index_factory(dim, spec.factory, faiss.METRIC_INNER_PRODUCT)


def build(spec: IndexSpec, matrix: np.ndarray, seed: int = 0) -> Any:
    """Train (approximate types, on at most 100,000 sampled rows) and fill an index with ``matrix`` [N, D]."""
    check_trainable(spec, len(matrix))
    index = new_index(spec, matrix.shape[1])
    if not index.is_trained:
        rng = np.random.default_rng(seed)
        sample = matrix if len(matrix) <= MAX_TRAIN_ROWS else matrix[np.sort(rng.choice(len(matrix), MAX_TRAIN_ROWS))]
        index.train(np.ascontiguousarray(sample, dtype=np.float32))
    add_rows(index, matrix)
    apply_params(index, spec.params)
    return index


def add_rows(index: Any, matrix: np.ndarray, chunk: int = 65536) -> None:
    for start in range(0, len(matrix), chunk):
        index.add(np.ascontiguousarray(matrix[start : start + chunk], dtype=np.float32))


def exact_top_k(matrix: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    faiss = require("faiss", "search indexes")

    exact = faiss.IndexFlatIP(matrix.shape[1])
    add_rows(exact, matrix)
    return exact.search(np.ascontiguousarray(queries, dtype=np.float32), k)[1]


def recall_at_k(index: Any, matrix: np.ndarray, k: int = 10, n_queries: int = RECALL_QUERIES, seed: int = 0) -> float:
    """Mean overlap of the index's top-k with exact top-k, for queries sampled from the gallery rows (each query a
    gallery row plus small noise, so the query itself is not trivially its own first hit)."""
    rng = np.random.default_rng(seed)
    rows = rng.choice(len(matrix), size=min(n_queries, len(matrix)), replace=False)
    queries = matrix[rows] + rng.normal(0, 0.02, (len(rows), matrix.shape[1])).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    k = min(k, len(matrix))
    truth = exact_top_k(matrix, queries, k)
    found = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)[1]
    hits = [len(set(a.tolist()) & set(b.tolist())) for a, b in zip(found, truth, strict=True)]
    return float(np.mean(hits) / k)


def build_measured(kind: str, matrix: np.ndarray) -> tuple[Any, IndexSpec, dict[str, Any]]:
    """Build ``kind`` over ``matrix`` and return ``(index, spec, stats)``; stats hold build seconds and, for an
    approximate type, recall@10 against exact search."""
    spec = make_spec(kind, len(matrix), matrix.shape[1])
    start = time.perf_counter()
    index = build(spec, matrix)
    stats: dict[str, Any] = {"build_seconds": round(time.perf_counter() - start, 3)}
    if spec.kind != "flat":
        stats["recall_at_10"] = round(recall_at_k(index, matrix), 4)
        _logger.info("%s index: recall@10 %.4f against exact search", spec.kind, stats["recall_at_10"])
    return index, spec, stats
