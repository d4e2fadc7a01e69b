"""Build a search index: image features of an ``imgs`` LMDB or an image folder in an exact FAISS inner-product
index (``IndexFlatIP``; features are L2-normalised, so scores are cosine similarities).

Index directory::

    index.faiss   faiss.write_index of IndexFlatIP(D), row i = item i
    ids.json      [id, ...]   LMDB image ids (int or str) or, for folders, paths relative to the folder
    paths.json    [absolute image path, ...]  (folders only)
    meta.json     architecture, checkpoint, resolution, context length, logit scale, counts, source
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

from cn_clip.errors import ConfigError, DataError
from cn_clip.eval import features as F
from cn_clip.fileio import atomic_dir
from cn_clip.models.matryoshka import check_dim
from cn_clip.runtime import resolve_device

_logger = logging.getLogger(__name__)

INDEX_FILE, IDS_FILE, PATHS_FILE, META_FILE = "index.faiss", "ids.json", "paths.json", "meta.json"
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"})
FORMAT_VERSION = 1


def is_lmdb(path: Path) -> bool:
    return (path / "data.mdb").is_file()


def list_images(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursive, by extension), sorted by relative path."""
    files = [p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    return sorted(files, key=lambda p: p.relative_to(folder).as_posix())


class FolderImageDataset:
    """``(relative path, image tensor)`` items of image files; an unreadable file is an error naming it."""

    def __init__(self, root: Path, files: Sequence[Path], resolution: int) -> None:
        from cn_clip.transforms import image_transform

        self.root = root
        self.files = list(files)
        self.transform = image_transform(resolution)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[str, Any]:
        return self.files[index].relative_to(self.root).as_posix(), load_image(self.files[index], self.transform)


def load_image(path: Path, transform: Any) -> Any:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            return transform(image)
    except (OSError, UnidentifiedImageError) as exc:
        raise DataError(f"{path}: cannot read this image ({type(exc).__name__}: {exc})") from None


def _source_dataset(image_data: Path, resolution: int, id_type: str) -> tuple[Any, list[str] | None, str]:
    from cn_clip.data.lmdb_dataset import LMDBImageDataset

    if not image_data.exists():
        raise DataError(f"--image-data {image_data} does not exist")
    if image_data.is_dir() and is_lmdb(image_data):
        return LMDBImageDataset(image_data, resolution=resolution, id_type=id_type), None, "lmdb"
    if not image_data.is_dir():
        raise DataError(f"--image-data {image_data}: expected an imgs LMDB directory or a folder of images")
    files = list_images(image_data)
    if not files:
        extensions = ", ".join(sorted(IMAGE_EXTENSIONS))
        raise DataError(f"{image_data}: no image files ({extensions}) and no LMDB (data.mdb) found")
    paths = [str(p.resolve()) for p in files]
    return FolderImageDataset(image_data, files, resolution), paths, "folder"


def build_index(
    image_data: str | os.PathLike,
    resume: str | os.PathLike,
    out: str | os.PathLike,
    *,
    architecture: str | None = None,
    device: str | None = None,
    precision: str = "fp32",
    batch_size: int = 64,
    num_workers: int = 0,
    context_length: int = 52,
    id_type: str = "auto",
    overwrite: bool = False,
    progress: bool = True,
    dim: int | None = None,
    interpolate_positions: bool = False,
) -> dict[str, Any]:
    """Extract, index and write ``out`` atomically; returns the metadata written to ``meta.json``. ``dim=k`` indexes
    Matryoshka features (the first k coordinates, re-normalised); queries are truncated the same way."""
    from cn_clip.extras import require

    faiss = require("faiss", "building a search index")

    if Path(out).exists() and not overwrite:
        raise ConfigError(f"{out} already exists (pass --overwrite to replace it)")
    device = resolve_device(device)
    model, ckpt_meta = F.load_eval_model(
        architecture,
        resume,
        device,
        precision,
        context_length=context_length,
        interpolate_positions=interpolate_positions,
    )
    image_data = Path(image_data)
    resolution = model.cfg.vision.image_resolution
    dataset, paths, kind = _source_dataset(image_data, resolution, id_type)
    if dim is not None:
        check_dim(dim, model.cfg.embed_dim)
    encoder = F.TorchEncoder(partial(model.encode_image, dim=dim), device, precision)
    batches = F.sequential_batches(len(dataset), batch_size)
    extracted = F.extract_dataset(encoder, dataset, batches, num_workers=num_workers, desc="images", progress=progress)
    index = faiss.IndexFlatIP(extracted.matrix.shape[1])
    index.add(extracted.matrix)
    meta = {
        "format": FORMAT_VERSION,
        "architecture": ckpt_meta["architecture"],
        "checkpoint": str(Path(resume).resolve()),
        "epoch": ckpt_meta.get("epoch"),
        "step": ckpt_meta.get("step"),
        "precision": precision,
        "resolution": resolution,
        "context_length": context_length,
        "interpolate_positions": interpolate_positions,
        "logit_scale": float(model.logit_scale.detach().float().exp()),
        "count": index.ntotal,
        "dim": index.d,
        "matryoshka_dim": dim,
        "source": str(image_data.resolve()),
        "source_kind": kind,
        "metric": "inner product of L2-normalised features = cosine similarity",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    with atomic_dir(out, overwrite=overwrite) as tmp:
        faiss.write_index(index, str(tmp / INDEX_FILE))
        (tmp / IDS_FILE).write_text(json.dumps(extracted.ids, ensure_ascii=False), encoding="utf-8")
        if paths is not None:
            (tmp / PATHS_FILE).write_text(json.dumps(paths, ensure_ascii=False), encoding="utf-8")
        (tmp / META_FILE).write_text(json.dumps(meta, ensure_ascii=False, indent=1), encoding="utf-8")
    _logger.info("indexed %d images (dim %d) from %s into %s", index.ntotal, index.d, image_data, out)
    return meta
