"""Query a search index: text→image (``"一只猫"``) or image→image (``--image q.jpg``).

Scores: ``cosine`` (default) is the inner product of L2-normalised features, in [-1, 1]; it is comparable across
queries of one model but is not a probability. ``softmax`` is ``softmax(logit_scale · cosine)`` over the k hits
returned (the model's own temperature, as in ``get_similarity``), so it sums to 1 over those hits: a relative
preference among them, not a calibrated probability of a match.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from cn_clip.errors import ConfigError, DataError
from cn_clip.eval import features as F
from cn_clip.runtime import resolve_device
from cn_clip.search.index import load_image

_logger = logging.getLogger(__name__)

SCORES = ("cosine", "softmax")


@dataclass
class Hit:
    rank: int
    id: Any
    score: float
    path: str | None = None
    probability: float | None = None  # calibrated match probability (with a calib.json)

    def to_json(self) -> dict[str, Any]:
        out = {"rank": self.rank, "id": self.id, "score": self.score, "path": self.path}
        if self.probability is not None:
            out["probability"] = self.probability
        return out


class SearchIndex:
    """A loaded index directory (see :mod:`cn_clip.search.store`), memory-mapped where FAISS allows."""

    def __init__(self, directory: str | os.PathLike) -> None:
        from cn_clip.extras import require
        from cn_clip.search import store

        require("faiss", "searching an index")

        self.directory = Path(directory)
        self.gallery = store.load(self.directory)
        self.meta = self.gallery.meta
        self.index = self.gallery.index
        self.ids = self.gallery.ids

    def search(self, vectors: np.ndarray, top_k: int, score: str = "cosine", offset: int = 0) -> list[list[Hit]]:
        """Best ``top_k`` items per query row after skipping ``offset`` (rows must be L2-normalised)."""
        if score not in SCORES:
            raise ConfigError(f"unknown score {score!r}; choose from {', '.join(SCORES)}")
        k = min(top_k + offset, self.index.ntotal)
        sims, rows = self.index.search(np.ascontiguousarray(vectors, dtype=np.float32), k)
        results = []
        for sim_row, index_row in zip(sims, rows, strict=True):
            found = index_row >= 0  # an approximate index may return fewer than k (label -1)
            values, labels = sim_row[found].astype(np.float64), index_row[found]
            if score == "softmax":
                logits = self.meta["logit_scale"] * values
                values = np.exp(logits - logits.max())
                values /= values.sum()
            results.append(
                [
                    Hit(rank + 1, self.ids[j], float(v), self.gallery.path_of(j))
                    for rank, (j, v) in enumerate(zip(labels.tolist(), values.tolist(), strict=True))
                    if rank >= offset
                ]
            )
        return results


def encode_query(model: Any, meta: dict[str, Any], text: str | None, image: str | None, device: str) -> np.ndarray:
    """One L2-normalised query row ``[1, D]`` from a text or an image file."""
    if (text is None) == (image is None):
        raise ConfigError("give either a query text or --image PATH (not both)")
    if text is not None:
        from cn_clip.tokenizer import get_tokenizer

        tokenizer = get_tokenizer(model.cfg)
        tokens = tokenizer([tokenizer.normalize(text)], meta.get("context_length", 52))
        encode_text = partial(model.encode_text, dim=meta.get("matryoshka_dim"))  # None: full width
        return F.l2_normalize(F.TorchEncoder(encode_text, device)(tokens))
    from cn_clip.transforms import image_transform

    path = Path(image)
    if not path.is_file():
        raise DataError(f"--image {path} does not exist")
    tensor = load_image(path, image_transform(meta["resolution"]))[None]
    encode_image = partial(model.encode_image, dim=meta.get("matryoshka_dim"))
    return F.l2_normalize(F.TorchEncoder(encode_image, device)(tensor))


def query(
    index_dir: str | os.PathLike,
    text: str | None = None,
    image: str | None = None,
    *,
    top_k: int = 5,
    score: str = "cosine",
    resume: str | None = None,
    device: str | None = None,
    calibration: str | os.PathLike | None = None,
    min_probability: float | None = None,
) -> list[Hit]:
    """Hits for one query, best first. The model is the index's checkpoint unless ``resume`` overrides it.

    With ``calibration`` (a ``calib.json``) each hit carries its match probability, and hits below
    ``min_probability`` are dropped."""
    if min_probability is not None and calibration is None:
        raise ConfigError("--min-probability needs --calibration calib.json (cosines are not probabilities)")
    index = SearchIndex(index_dir)
    device = resolve_device(device)
    checkpoint = resume or index.meta["checkpoint"]
    model, _ = F.load_eval_model(
        index.meta["architecture"],
        checkpoint,
        device,
        "fp32",
        context_length=index.meta.get("context_length"),
        interpolate_positions=index.meta.get("interpolate_positions", False),
    )
    vector = encode_query(model, index.meta, text, image, device)
    if vector.shape[1] != index.index.d:
        raise ConfigError(f"the model gives {vector.shape[1]}-d features but the index holds {index.index.d}-d")
    hits = index.search(vector, top_k, score)[0]
    if calibration is None:
        return hits
    return _with_probabilities(index, vector, hits, top_k, score, calibration, checkpoint, min_probability)


def _with_probabilities(
    index: SearchIndex,
    vector: np.ndarray,
    hits: list[Hit],
    top_k: int,
    score: str,
    calibration: str | os.PathLike,
    checkpoint: str,
    min_probability: float | None,
) -> list[Hit]:
    from cn_clip.eval.calibrate import Calibrator

    calibrator = Calibrator.load(calibration, checkpoint=checkpoint)  # warns if fitted for another model
    cosines = [h.score for h in hits] if score == "cosine" else [h.score for h in index.search(vector, top_k)[0]]
    log_norm = None
    if calibrator.per_row:  # temperature: normalised over every indexed item
        everything = index.index.search(np.ascontiguousarray(vector, dtype=np.float32), index.index.ntotal)[0]
        log_norm = calibrator.log_normaliser_of_scores(everything)
    probabilities = calibrator.probabilities_of_hits(np.asarray([cosines]), log_norm)[0]
    for hit, probability in zip(hits, probabilities.tolist(), strict=True):
        hit.probability = probability
    if min_probability is not None:
        hits = [hit for hit in hits if hit.probability >= min_probability]
    return hits
