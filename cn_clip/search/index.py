"""Build and grow a search index: image features of an ``imgs`` LMDB, an image folder, a CSV/JSONL of image files or
WebDataset shards (``--dataset-type``, docs/data.md) in a FAISS
inner-product index (features are L2-normalised, so scores are cosine similarities). The directory layout, its
atomic updates and the index types are described in :mod:`cn_clip.search.store` and :mod:`cn_clip.search.ann`.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from cn_clip.errors import ConfigError, DataError
from cn_clip.eval import features as F
from cn_clip.models.matryoshka import check_dim
from cn_clip.runtime import resolve_device
from cn_clip.search import ann

_logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"})


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


def _source_dataset(image_data: str, resolution: int, reading: ImageReading) -> tuple[Any, list[str], dict[str, Any]]:
    """The dataset of ``image_data``, each row's key in it and the source record (``meta.json``'s ``sources``): an
    LMDB key, a folder's relative path, a file list's image path or URL, or a shard row ``number:offset:size``
    (``shards`` lists the shard URLs). Every kind can be read back for the search page."""
    from cn_clip.data.filelist import is_url
    from cn_clip.data.lmdb_dataset import LMDBImageDataset
    from cn_clip.data.sources import ListImages, ShardImages, image_dataset, source_options

    options = {**source_options(None), **(reading.source or {})}
    kind = options["dataset_type"]
    local = Path(image_data)
    if not (is_url(image_data) or local.exists() or any(mark in image_data for mark in ("{", "::", "pipe:"))):
        raise DataError(f"--image-data {image_data} does not exist")
    if kind in ("auto", "lmdb") and local.is_dir() and is_lmdb(local):
        dataset = LMDBImageDataset(local, resolution=resolution, id_type=reading.id_type)
        source = {"kind": "lmdb", "path": str(local.resolve())}
        return dataset, [key.decode("utf-8") for key in dataset.keys], source
    if kind == "auto" and local.is_dir() and not (local / "imgs").is_dir():
        files = list_images(local)
        if not files:
            extensions = ", ".join(sorted(IMAGE_EXTENSIONS))
            raise DataError(f"{image_data}: no image files ({extensions}) and no LMDB (data.mdb) found")
        dataset = FolderImageDataset(local, files, resolution)
        source = {"kind": "folder", "path": str(local.resolve())}
        return dataset, [f.relative_to(local).as_posix() for f in files], source
    dataset = image_dataset(image_data, resolution=resolution, id_type=reading.id_type, **options)
    if isinstance(dataset, LMDBImageDataset):  # an LMDB split dir (imgs/ + pairs/) or --dataset-type lmdb
        source = {"kind": "lmdb", "path": str(dataset.lmdb_path.resolve())}
        return dataset, [key.decode("utf-8") for key in dataset.keys], source
    if isinstance(dataset, ListImages):
        return dataset, list(dataset.locations), {"kind": "files", "path": _absolute(image_data)}
    if isinstance(dataset, ShardImages):
        keys = [f"{number}:{offset}:{size}" for number, offset, size in dataset.places]
        return dataset, keys, {"kind": "shards", "path": image_data, "shards": [_absolute(u) for u in dataset.urls]}
    raise ConfigError(f"{image_data}: no images to index here")


def _absolute(location: str) -> str:
    """A local path made absolute (the index may be served from another directory); URLs unchanged."""
    from cn_clip.data.filelist import is_url

    return location if is_url(location) else str(Path(location).resolve())


@dataclass
class ImageReading:
    """How gallery images are read and batched for encoding."""

    batch_size: int = 64
    num_workers: int = 0
    id_type: str = "auto"  # LMDB key → id, see cn_clip.data.formats.image_id_from_key
    progress: bool = True
    source: dict[str, Any] | None = None  # --dataset-type and file-list columns (data.sources.source_options)


def encode_images(
    image_data: str | os.PathLike,
    model: Any,
    device: str,
    precision: str = "fp32",
    reading: ImageReading | None = None,
    dim: int | None = None,
) -> tuple[F.Extracted, list[str], dict[str, str]]:
    """Features of every image of an LMDB, a folder, a file list or shards: ``(extracted, keys, source)``, rows in
    source order; ``dim``: Matryoshka width (None: full)."""
    reading = reading or ImageReading()
    dataset, keys, source = _source_dataset(str(image_data), model.cfg.vision.image_resolution, reading)
    encoder = F.TorchEncoder(partial(model.encode_image, dim=dim), device, precision)
    batches = F.sequential_batches(len(dataset), reading.batch_size)
    extracted = F.extract_dataset(
        encoder, dataset, batches, num_workers=reading.num_workers, desc="images", progress=reading.progress
    )
    return extracted, keys, source


def build_index(
    image_data: str | os.PathLike,
    resume: str | os.PathLike,
    out: str | os.PathLike,
    *,
    architecture: str | None = None,
    device: str | None = None,
    precision: str = "fp32",
    context_length: int = 52,
    index_type: str = "flat",
    reading: ImageReading | None = None,
    overwrite: bool = False,
    dim: int | None = None,
    interpolate_positions: bool = False,
) -> dict[str, Any]:
    """Extract, index (``index_type``: see :mod:`cn_clip.search.ann`) and write ``out`` atomically; returns the
    metadata written to ``meta.json``. ``dim=k`` indexes Matryoshka features (the first k coordinates,
    re-normalised); queries are truncated the same way."""
    from cn_clip.search import store

    if Path(out).exists() and not overwrite:
        raise ConfigError(f"{out} already exists (pass --overwrite to replace it)")
    ann.resolve_kind(index_type, 0)  # an unknown type fails before the model loads
    device = resolve_device(device)
    model, ckpt_meta = F.load_eval_model(
        architecture,
        resume,
        device,
        precision,
        context_length=context_length,
        interpolate_positions=interpolate_positions,
    )
    if dim is not None:
        check_dim(dim, model.cfg.embed_dim)
    extracted, keys, source = encode_images(image_data, model, device, precision, reading, dim)
    meta = {
        "architecture": ckpt_meta["architecture"],
        "checkpoint": str(Path(resume).resolve()),
        "epoch": ckpt_meta.get("epoch"),
        "step": ckpt_meta.get("step"),
        "precision": precision,
        "resolution": model.cfg.vision.image_resolution,
        "context_length": context_length,
        "interpolate_positions": interpolate_positions,
        "logit_scale": float(model.logit_scale.detach().float().exp()),
        "sources": [source],
        "matryoshka_dim": dim,
        "metric": "inner product of L2-normalised features = cosine similarity",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    locations = [[0, key] for key in keys]
    meta = store.create(out, extracted.matrix, extracted.ids, locations, meta, index_type, overwrite=overwrite)
    _logger.info("indexed %d images (dim %d) from %s into %s", meta["count"], meta["dim"], image_data, out)
    return meta


def add_images(
    index_dir: str | os.PathLike,
    image_data: str | os.PathLike,
    *,
    device: str | None = None,
    reading: ImageReading | None = None,
) -> dict[str, Any]:
    """Encode ``image_data`` with the index's own checkpoint and append it as a new generation (atomic)."""
    from cn_clip.search import store

    meta = store.read_meta(index_dir)
    device = resolve_device(device)
    precision = meta.get("precision", "fp32")
    model, _ = F.load_eval_model(meta["architecture"], meta["checkpoint"], device, precision, announce=False)
    extracted, keys, source = encode_images(image_data, model, device, precision, reading)
    return store.add(index_dir, extracted.matrix, extracted.ids, keys, source)
