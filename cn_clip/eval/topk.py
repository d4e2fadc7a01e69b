"""Exact top-k inner-product search with the reference's tie order, in bounded memory.

The reference ranks every gallery item per query with Python's stable ``sorted`` (descending fp32 dot product; equal
scores keep gallery-file order). Here the score matrix is computed in chunks ([query chunk, gallery chunk]); each
back end only proposes *candidates* per query row — a superset of the row's top-k, all entries at or above some
lower bound of the k-th largest score — and one shared selection step orders candidates by (score descending,
gallery index ascending) and keeps k. Partial top-k routines (``torch.topk``, FAISS heaps) are not stable; because
every entry tied with the k-th score is a candidate, the outcome never depends on their tie order.

Back ends: ``numpy`` (CPU, default: no torch import), ``torch`` (any device), ``faiss`` (exact ``IndexFlatIP``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from cn_clip.errors import DataError
from cn_clip.eval.featio import Features

_logger = logging.getLogger(__name__)

BACKENDS = ("auto", "numpy", "torch", "faiss")
DEFAULT_GALLERY_CHUNK = 32768  # the reference's --eval-batch-size
SCORE_BUDGET = 1 << 23  # elements of one [query chunk, gallery chunk] score matrix (32 MiB fp32)

# (query rows [Qc, D], gallery chunk [Gc, D], k) → candidate (row, column, score) triples, row-major, columns
# ascending within a row. Every entry tied with or above the row's k-th largest score must be included.
CandidateFn = Callable[[np.ndarray, np.ndarray, int], tuple[np.ndarray, np.ndarray, np.ndarray]]


@dataclass
class TopK:
    """Per query: gallery indices ``[Q, k']`` and their fp32 scores, best first (``k' = min(k, N)``)."""

    indices: np.ndarray
    scores: np.ndarray


def resolve_backend(backend: str, device: str | None) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    if backend == "auto":
        return "numpy" if device in (None, "cpu") else "torch"
    if backend in ("numpy", "faiss") and device not in (None, "cpu"):
        raise ValueError(f"backend {backend!r} runs on the CPU only; use --backend torch for --device {device}")
    return backend


def topk_search(
    queries: np.ndarray,
    gallery: np.ndarray,
    k: int,
    *,
    backend: str = "auto",
    device: str | None = None,
    gallery_chunk: int = DEFAULT_GALLERY_CHUNK,
    query_chunk: int | None = None,
) -> TopK:
    """Top-k gallery rows by fp32 inner product for each query row; ties keep gallery order (stable)."""
    if k < 1:
        raise ValueError(f"top-k must be >= 1, got {k}")
    if gallery_chunk < 1:
        raise ValueError(f"gallery chunk size must be >= 1, got {gallery_chunk}")
    if queries.shape[1] != gallery.shape[1]:
        raise ValueError(f"query dim {queries.shape[1]} != gallery dim {gallery.shape[1]}")
    n_query, n_gallery = len(queries), len(gallery)
    gallery_chunk = min(gallery_chunk, max(n_gallery, 1))
    query_chunk = query_chunk or max(1, SCORE_BUDGET // gallery_chunk)
    candidates = _candidate_fn(resolve_backend(backend, device), device)
    best_idx = np.zeros((n_query, 0), dtype=np.int64)
    best_val = np.zeros((n_query, 0), dtype=np.float32)
    # Gallery outside: every gallery chunk (possibly memory-mapped, float16) is read and converted once.
    for g0 in range(0, n_gallery, gallery_chunk):
        chunk = np.ascontiguousarray(gallery[g0 : g0 + gallery_chunk], dtype=np.float32)
        keep = min(k, g0 + len(chunk))  # gallery rows seen so far may still be fewer than k
        new_idx, new_val = [], []
        for q0 in range(0, n_query, query_chunk):
            q = np.ascontiguousarray(queries[q0 : q0 + query_chunk], dtype=np.float32)
            rows, cols, vals = candidates(q, chunk, k)
            idx, val = _merge(best_idx[q0 : q0 + len(q)], best_val[q0 : q0 + len(q)], rows, cols + g0, vals, keep)
            new_idx.append(idx)
            new_val.append(val)
        best_idx, best_val = np.concatenate(new_idx), np.concatenate(new_val)
    return TopK(indices=best_idx, scores=best_val)


def _merge(
    prev_idx: np.ndarray, prev_val: np.ndarray, rows: np.ndarray, cols: np.ndarray, vals: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Keep the k best of (previous best, new candidates) per row: score descending, then gallery index ascending.

    ``lexsort`` is stable, so tied entries keep their input order: previous best first (smaller indices, already
    in index order among ties), then the new chunk's candidates in column order.
    """
    n_rows, n_prev = prev_idx.shape
    all_rows = np.concatenate([np.repeat(np.arange(n_rows), n_prev), rows])
    all_cols = np.concatenate([prev_idx.ravel(), cols])
    all_vals = np.concatenate([prev_val.ravel(), vals])
    order = np.lexsort((-all_vals, all_rows))
    sorted_rows = all_rows[order]
    row_start = np.searchsorted(sorted_rows, np.arange(n_rows))
    rank = np.arange(len(order)) - row_start[sorted_rows]
    chosen = order[rank < k]
    return all_cols[chosen].reshape(n_rows, k), all_vals[chosen].reshape(n_rows, k)


def _candidate_fn(backend: str, device: str | None) -> CandidateFn:
    if backend == "numpy":
        return _numpy_candidates
    if backend == "faiss":
        return _faiss_candidates
    return _torch_candidates_fn(device or "cpu")


def _all_entries(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rows, cols = np.indices(scores.shape).reshape(2, -1)
    return rows, cols, scores.ravel()


def _numpy_candidates(q: np.ndarray, chunk: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    scores = q @ chunk.T  # [Qc, Gc] fp32
    n = scores.shape[1]
    if n <= k:
        return _all_entries(scores)
    # The smallest of k disjoint block maxima is <= the k-th largest score (k distinct entries reach it): a cheap,
    # exact lower bound; np.argpartition would cost ~3x the matrix product.
    starts = (np.arange(k) * n) // k
    bound = np.maximum.reduceat(scores, starts, axis=1).min(axis=1)
    rows, cols = np.nonzero(scores >= bound[:, None])
    return rows, cols, scores[rows, cols]


def _faiss_candidates(q: np.ndarray, chunk: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from cn_clip.extras import require

    faiss = require("faiss", "--backend faiss")

    n = len(chunk)
    if n <= k:
        return _numpy_candidates(q, chunk, k)
    index = faiss.IndexFlatIP(chunk.shape[1])
    index.add(chunk)
    vals, cols = index.search(q, k + 1)  # one extra: detects a tie across the k-th place
    tied = vals[:, k] == vals[:, k - 1]
    vals, cols = vals[:, :k], cols[:, :k]
    order = np.argsort(cols, axis=1)  # columns ascending within a row, as the selection step expects
    cols, vals = np.take_along_axis(cols, order, 1), np.take_along_axis(vals, order, 1)
    rows = np.repeat(np.arange(len(q)), k).reshape(len(q), k)
    if not tied.any():
        return rows.ravel(), cols.ravel(), vals.ravel()
    # Rows whose k-th and (k+1)-th scores are equal may have more tied entries than FAISS returned: rescore them
    # in full so the earliest gallery items win, as in the reference.
    ok = ~tied
    t_rows, t_cols, t_vals = _numpy_candidates(q[tied], chunk, k)
    t_rows = np.flatnonzero(tied)[t_rows]
    all_rows = np.concatenate([rows[ok].ravel(), t_rows])
    order = np.argsort(all_rows, kind="stable")
    return (
        all_rows[order],
        np.concatenate([cols[ok].ravel(), t_cols])[order],
        np.concatenate([vals[ok].ravel(), t_vals])[order],
    )


def _torch_candidates_fn(device: str) -> CandidateFn:
    import torch

    uploaded: dict[int, tuple[np.ndarray, torch.Tensor]] = {}  # the current gallery chunk, moved once

    def on_device(chunk: np.ndarray) -> torch.Tensor:
        if id(chunk) not in uploaded or uploaded[id(chunk)][0] is not chunk:
            uploaded.clear()
            uploaded[id(chunk)] = (chunk, torch.from_numpy(chunk).to(device))
        return uploaded[id(chunk)][1]

    def candidates(q: np.ndarray, chunk: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        with torch.inference_mode():
            scores = torch.from_numpy(q).to(device) @ on_device(chunk).T  # [Qc, Gc] fp32
            if scores.shape[1] <= k:
                rows, cols = torch.nonzero(torch.ones_like(scores, dtype=torch.bool), as_tuple=True)
            else:
                kth = torch.topk(scores, k, dim=1, sorted=True).values[:, -1:]  # exact k-th largest
                rows, cols = torch.nonzero(scores >= kth, as_tuple=True)  # row-major, columns ascending
            vals = scores[rows, cols]
            return rows.cpu().numpy(), cols.cpu().numpy(), vals.cpu().numpy()

    return candidates


def evaluate_retrieval(
    image_feats: Features,
    text_feats: Features,
    ground_truth: Mapping[Any, Sequence[Any]],
    ks: Sequence[int] = (1, 5, 10),
    *,
    backend: str = "auto",
    device: str | None = None,
    gallery_chunk: int = DEFAULT_GALLERY_CHUNK,
) -> dict[str, Any]:
    """Recall@K both ways straight from features (no files), in percent.

    ``ground_truth`` maps text id → image ids (the reference's annotation). Text→image queries are its text ids;
    image→text queries are the images it mentions, as in the ``.tr.jsonl`` the reference derives. Returns
    ``{"text_to_image": {"r1": .., "r5": .., "r10": .., "mean_recall": ..}, "image_to_text": {...},
    "mean_recall": <mean of both>}``; the per-direction numbers equal what ``evaluation.py`` reports.
    """
    from cn_clip.eval.metrics import recall_at_k
    from cn_clip.eval.transform_ir_annotation_to_tr import invert_annotations

    truths = {"text_to_image": dict(ground_truth), "image_to_text": invert_annotations(ground_truth.items())}
    sides = {"text_to_image": (text_feats, image_feats), "image_to_text": (image_feats, text_feats)}
    result: dict[str, Any] = {}
    for name, truth in truths.items():
        queries, gallery = sides[name]
        rows = _rows_of(queries, truth.keys())
        top = topk_search(
            queries.matrix[rows], gallery.matrix, max(ks), backend=backend, device=device, gallery_chunk=gallery_chunk
        )
        ranked = {qid: [gallery.ids[j] for j in row] for qid, row in zip(truth, top.indices.tolist(), strict=True)}
        recalls = {key: value * 100 for key, value in recall_at_k(ranked, truth, ks).items()}
        recalls["mean_recall"] = sum(recalls.values()) / len(ks)
        result[name] = recalls
    result["mean_recall"] = (result["text_to_image"]["mean_recall"] + result["image_to_text"]["mean_recall"]) / 2
    return result


def _rows_of(features: Features, wanted: Iterable[Any]) -> np.ndarray:
    position = {item: i for i, item in enumerate(features.ids)}
    missing = [item for item in wanted if item not in position]
    if missing:
        shown = ", ".join(str(item) for item in missing[:10]) + (" ..." if len(missing) > 10 else "")
        source = features.path or "the features"
        raise DataError(f"{len(missing)} ground-truth {features.id_key}s have no feature in {source}: {shown}")
    return np.array([position[item] for item in wanted], dtype=np.int64)
