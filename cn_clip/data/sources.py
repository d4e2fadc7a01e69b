"""One factory for the images that evaluation and search read: ``image_dataset(path, dataset_type)``.

Every reader of :func:`cn_clip.data.loader.resolve_dataset_type` becomes a map-style dataset of ``(image_id, image
tensor)``, one item per distinct image id, so feature extraction batches, shards and orders it the same way:

- ``lmdb``: an ``imgs`` LMDB (or a split dir holding one), in LMDB key order (the reference's);
- ``csv``/``jsonl``: the images of a file list in first-appearance order;
- ``webdataset``: the images of the shards in shard order, found by one pass over the tar headers and then read
  by offset (local files and any seekable fsspec URL; ``pipe:`` streams cannot be read by offset).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

from cn_clip.data import formats
from cn_clip.errors import ConfigError, DataError

_logger = logging.getLogger(__name__)


def _transform(resolution: int) -> Callable:
    from cn_clip.transforms import image_transform

    return image_transform(resolution)


class ListImages:
    """The distinct images of a CSV/JSONL file list: ``(image_id, tensor)`` in first-appearance order."""

    def __init__(self, path: str, transform: Callable, **list_keys: Any) -> None:
        from cn_clip.data.filelist import read_records

        seen: dict[formats.Id, str] = {}
        for location, image_id, _text_id, _text in read_records(path, **list_keys, need_captions=False):
            seen.setdefault(image_id, location)
        self.ids = list(seen)
        self.locations = list(seen.values())
        self.transform = transform

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[formats.Id, Any]:
        from cn_clip.data.filelist import open_image

        image = open_image(self.locations[index], self.ids[index])
        try:
            return self.ids[index], self.transform(image)
        except DataError as exc:
            raise DataError(f"image_id {self.ids[index]}: {exc}") from None


def shard_urls(spec: str) -> list[str]:
    """The shard URLs of a WebDataset spec that can be read by offset (``::``-joined sources, brace patterns, lists)."""
    from cn_clip.data.wds_dataset import expand_source

    if spec.startswith("pipe:"):
        raise ConfigError(f"{spec}: a pipe: stream cannot be read by offset; extract from local shards or URLs")
    return [url for source in spec.split("::") if source for url in expand_source(source)]


def scan_shard(url: str) -> tuple[dict[str, tuple[int, int]], dict[str, tuple[formats.Id, formats.Id, Any]]]:
    """One pass over a shard's tar headers: each key's image ``(offset, size)`` and ``(image_id, text_id, caption)``
    from its ``.json`` (ids default to the key, as in training; caption None when absent) or ``.txt``; image bytes
    are skipped, not read."""
    import json
    import tarfile

    from cn_clip.data.wds_dataset import IMAGE_EXTS, open_stream

    images: dict[str, tuple[int, int]] = {}
    captions: dict[str, tuple[formats.Id, formats.Id, str]] = {}
    with open_stream(url) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
        for member in tar:
            key, _, ext = member.name.partition(".")
            ext = ext.lower()
            if ext in IMAGE_EXTS:
                images[key] = (member.offset_data, member.size)
            elif ext in ("json", "txt"):
                raw = tar.extractfile(member).read()
                try:
                    if ext == "txt":
                        captions[key] = (key, key, raw.decode("utf-8").strip())
                        continue
                    meta = json.loads(raw)
                except (ValueError, UnicodeDecodeError) as exc:
                    raise DataError(f"{url}: sample {key}: unreadable .{ext} ({type(exc).__name__}: {exc})") from None
                if not isinstance(meta, dict):
                    raise DataError(f"{url}: sample {key}: .json is not an object")
                text = meta.get("text")  # checked by caption_records: extracting images needs no caption
                captions[key] = (meta.get("image_id", key), meta.get("text_id", key), text)
    return images, captions


def caption_records(
    path: str | os.PathLike, dataset_type: str = "auto", **list_keys: Any
) -> list[tuple[formats.Id, formats.Id, str]]:
    """Every ``(image_id, text_id, caption)`` pair of a file list or of WebDataset shards, in data order: what
    evaluation ranks when there is no ``{split}_texts.jsonl``."""
    from cn_clip.data.loader import resolve_dataset_type

    path = str(path)
    kind = resolve_dataset_type(path, dataset_type)
    if kind in ("csv", "jsonl"):
        from cn_clip.data.filelist import read_records

        return [(image_id, text_id, text) for _loc, image_id, text_id, text in read_records(path, **list_keys)]
    if kind == "webdataset":
        records = []
        for url in shard_urls(path):
            images, captions = scan_shard(url)
            for key, record in captions.items():
                if key in images and not isinstance(record[2], str):
                    raise DataError(f"{url}: sample {key}: .json has no string 'text'")
            records += [record for key, record in captions.items() if key in images]
        if not records:
            raise DataError(f"{path}: the shards hold no image-caption samples")
        return records
    raise ConfigError(f"{path}: captions are read from a file list or shards here, not from {kind} data")


def texts_by_id(records: list[tuple[formats.Id, formats.Id, str]], where: str) -> list[dict[str, Any]]:
    """Pairs → the reference's texts JSONL rows ``{"text_id", "text", "image_ids"}``, texts in first-appearance
    order; a text id carrying two different captions is an error."""
    rows: dict[formats.Id, dict[str, Any]] = {}
    for image_id, text_id, text in records:
        row = rows.setdefault(text_id, {"text_id": text_id, "text": text, "image_ids": []})
        if row["text"] != text:
            raise DataError(f"{where}: text_id {text_id} has two captions: {row['text']!r} and {text!r}")
        if image_id not in row["image_ids"]:
            row["image_ids"].append(image_id)
    return list(rows.values())


def read_shard_bytes(url: str, offset: int, size: int) -> bytes:
    """``size`` bytes at ``offset`` of a shard (an image member found by :func:`scan_shard`)."""
    from cn_clip.data.wds_dataset import open_stream

    try:
        with open_stream(url) as handle:
            handle.seek(offset)
            data = handle.read(size)
    except FileNotFoundError:
        raise DataError(f"{url}: shard not found") from None
    if len(data) != size:
        raise DataError(f"{url}: {size} bytes at offset {offset} expected, {len(data)} read (shard changed?)")
    return data


class ShardImages:
    """The distinct images of WebDataset shards: ``(image_id, tensor)`` in shard order, read by byte offset."""

    def __init__(self, spec: str, transform: Callable) -> None:
        self.urls = shard_urls(spec)
        self.transform = transform
        found: dict[formats.Id, tuple[int, int, int]] = {}
        for number, url in enumerate(self.urls):
            images, captions = scan_shard(url)
            for key, (offset, size) in images.items():
                image_id = captions[key][0] if key in captions else key
                found.setdefault(image_id, (number, offset, size))
        self.ids = list(found)
        self.places = list(found.values())
        self._handles: dict[int, Any] = {}
        self._pid: int | None = None
        _logger.info("%s: %d distinct images in %d shard(s)", spec, len(self.ids), len(self.urls))

    def __len__(self) -> int:
        return len(self.ids)

    def _read(self, number: int, offset: int, size: int) -> bytes:
        from cn_clip.data.wds_dataset import open_stream

        if self._pid != os.getpid():  # handles are per process (DataLoader workers)
            self._handles, self._pid = {}, os.getpid()
        if number not in self._handles:
            self._handles[number] = open_stream(self.urls[number])
        handle = self._handles[number]
        handle.seek(offset)
        return handle.read(size)

    def __getitem__(self, index: int) -> tuple[formats.Id, Any]:
        import io

        from PIL import Image

        image_id = self.ids[index]
        number, offset, size = self.places[index]
        try:
            image = Image.open(io.BytesIO(self._read(number, offset, size)))
            return image_id, self.transform(image)
        except (OSError, DataError) as exc:
            raise DataError(f"{self.urls[number]}: image_id {image_id}: {exc}") from None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_handles": {}, "_pid": None}


def image_dataset(
    path: str | os.PathLike,
    dataset_type: str = "auto",
    resolution: int = 224,
    id_type: str = "auto",
    transform: Callable | None = None,
    **list_keys: Any,
) -> Any:
    """``(image_id, image tensor)`` items of any reader (module doc); ``list_keys`` are :func:`read_records`'s
    ``img_key``/``caption_key``/``separator`` for a file list, ``id_type`` the LMDB key rule."""
    from cn_clip.data.loader import resolve_dataset_type

    path = str(path)
    transform = transform or _transform(resolution)
    if dataset_type in ("auto", "lmdb") and os.path.isfile(os.path.join(path, "data.mdb")):
        from cn_clip.data.lmdb_dataset import LMDBImageDataset

        return LMDBImageDataset(path, transform=transform, id_type=id_type)
    kind = resolve_dataset_type(path, dataset_type)
    if kind == "lmdb":
        from cn_clip.data.lmdb_dataset import LMDBImageDataset

        return LMDBImageDataset(os.path.join(path, "imgs"), transform=transform, id_type=id_type)
    if kind in ("csv", "jsonl"):
        return ListImages(path, transform, **list_keys)
    if kind == "webdataset":
        return ShardImages(path, transform)
    raise ConfigError(f"{path}: {kind} data has no images to extract")


def add_source_args(parser: Any) -> None:
    """``--dataset-type`` and the file-list column flags, for the commands that read images (docs/data.md)."""
    from cn_clip.data.loader import DATASET_TYPES

    parser.add_argument("--dataset-type", choices=DATASET_TYPES, default="auto", help="image reader; auto: by path")
    parser.add_argument("--csv-img-key", default="filepath", help="file list: column of the image path or URL")
    parser.add_argument("--csv-caption-key", default="title", help="file list: column of the caption(s)")
    parser.add_argument("--csv-separator", default=None, help="file list: separator (',' for .csv, tab for .tsv)")


def source_options(args: Any) -> dict[str, Any]:
    """The :func:`image_dataset` keywords from flags added by :func:`add_source_args` (defaults when absent)."""
    return {
        "dataset_type": getattr(args, "dataset_type", "auto"),
        "img_key": getattr(args, "csv_img_key", "filepath"),
        "caption_key": getattr(args, "csv_caption_key", "title"),
        "separator": getattr(args, "csv_separator", None),
    }
