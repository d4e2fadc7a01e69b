"""Query a search index: text→image (``"一只猫"``) or image→image (``--image q.jpg``).

Scores: ``cosine`` (default) is the inner product of L2-normalised features, in [-1, 1]; it is comparable across
queries of one model but is not a probability. ``softmax`` is ``softmax(logit_scale · cosine)`` over the k hits
returned (the model's own temperature, as in ``get_similarity``), so it sums to 1 over those hits: a relative
preference among them, not a calibrated probability of a match.
"""

from __future__ import annotations

import json
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
from cn_clip.search.index import IDS_FILE, INDEX_FILE, META_FILE, PATHS_FILE, load_image

_logger = logging.getLogger(__name__)

SCORES = ("cosine", "softmax")


@dataclass
class Hit:
    rank: int
    id: Any
    score: float
    path: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"rank": self.rank, "id": self.id, "score": self.score, "path": self.path}


class SearchIndex:
    """A loaded index directory (see :mod:`cn_clip.search.index`)."""

    def __init__(self, directory: str | os.PathLike) -> None:
        from cn_clip.extras import require

        faiss = require("faiss", "searching an index")

        self.directory = Path(directory)
        for name in (INDEX_FILE, IDS_FILE, META_FILE):
            if not (self.directory / name).is_file():
                raise DataError(f"{self.directory}: not a search index ({name} missing; build one with 'index')")
        self.meta = json.loads((self.directory / META_FILE).read_text(encoding="utf-8"))
        self.index = faiss.read_index(str(self.directory / INDEX_FILE))
        self.ids = json.loads((self.directory / IDS_FILE).read_text(encoding="utf-8"))
        paths_file = self.directory / PATHS_FILE
        self.paths = json.loads(paths_file.read_text(encoding="utf-8")) if paths_file.is_file() else None
        if len(self.ids) != self.index.ntotal or (self.paths is not None and len(self.paths) != len(self.ids)):
            raise DataError(f"{self.directory}: {self.index.ntotal} vectors but {len(self.ids)} ids (damaged index)")

    def search(self, vectors: np.ndarray, top_k: int, score: str = "cosine") -> list[list[Hit]]:
        """Best ``top_k`` items per query row (rows must be L2-normalised)."""
        if score not in SCORES:
            raise ConfigError(f"unknown score {score!r}; choose from {', '.join(SCORES)}")
        k = min(top_k, self.index.ntotal)
        sims, rows = self.index.search(np.ascontiguousarray(vectors, dtype=np.float32), k)
        results = []
        for sim_row, index_row in zip(sims, rows, strict=True):
            values = sim_row.astype(np.float64)
            if score == "softmax":
                logits = self.meta["logit_scale"] * values
                values = np.exp(logits - logits.max())
                values /= values.sum()
            results.append(
                [
                    Hit(rank + 1, self.ids[j], float(v), self.paths[j] if self.paths else None)
                    for rank, (j, v) in enumerate(zip(index_row.tolist(), values.tolist(), strict=True))
                ]
            )
        return results


def encode_query(model: Any, meta: dict[str, Any], text: str | None, image: str | None, device: str) -> np.ndarray:
    """One L2-normalised query row ``[1, D]`` from a text or an image file."""
    if (text is None) == (image is None):
        raise ConfigError("give either a query text or --image PATH (not both)")
    if text is not None:
        from cn_clip.tokenizer import normalize_text, tokenize

        tokens = tokenize([normalize_text(text)], context_length=meta.get("context_length", 52))
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
) -> list[Hit]:
    """Hits for one query, best first. The model is the index's checkpoint unless ``resume`` overrides it."""
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
    return index.search(vector, top_k, score)[0]
