"""Pairs from a CSV/TSV or JSONL list of image files: train straight from a folder of photos and a caption file.

    filepath,title                      {"filepath": "imgs/1.jpg", "title": ["一只猫", "猫在睡觉"]}
    imgs/1.jpg,一只猫

The image column (``--csv-img-key``, default ``filepath``) holds a path relative to the list file, an absolute path,
or a URL any fsspec filesystem opens (``http(s)://``, ``s3://``, ...). The caption column (``--csv-caption-key``,
default ``title``) holds one caption; in JSONL it may also be a list of captions, one pair each, and a CSV may repeat
an image on several rows. Optional ``image_id`` / ``text_id`` columns name the ids used to mask duplicate positives;
without them the image path is the image id and the row (and caption position) the text id.
"""

from __future__ import annotations

import csv
import io
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

from cn_clip.data import formats
from cn_clip.data.lmdb_dataset import PairReader, check_on_bad_sample, encode_pair
from cn_clip.errors import ConfigError, DataError

_logger = logging.getLogger(__name__)
DEFAULT_IMG_KEY = "filepath"
DEFAULT_CAPTION_KEY = "title"


def is_url(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def read_bytes(path: str) -> bytes:
    """The bytes of a local path or of any fsspec URL."""
    if not is_url(path):
        with open(path.removeprefix("file://"), "rb") as handle:
            return handle.read()
    from cn_clip.extras import require

    fsspec = require("fsspec", f"reading {path}")
    try:
        with fsspec.open(path, "rb") as handle:
            return handle.read()
    except ImportError as exc:  # the URL's filesystem needs a package (aiohttp for http, s3fs for s3, ...)
        raise ConfigError(f"{path}: {exc}") from None


def resolve(base: str, path: str) -> str:
    """``path`` relative to the directory of the list file ``base`` (a local path or a URL)."""
    if is_url(path) or os.path.isabs(path):
        return path
    if is_url(base):
        return base.rsplit("/", 1)[0] + "/" + path
    return os.path.join(os.path.dirname(os.path.abspath(base)), path)


def open_image(location: str, image_id: Any) -> Any:
    """The PIL image at a path or URL; DataError naming the id when it is missing or not an image."""
    from PIL import Image

    try:
        return Image.open(io.BytesIO(read_bytes(location)))
    except FileNotFoundError:
        raise DataError(f"image_id {image_id}: {location} not found") from None
    except OSError as exc:
        raise DataError(f"image_id {image_id}: cannot open {location} ({type(exc).__name__}: {exc})") from None


def default_separator(path: str) -> str:
    return "\t" if path.lower().split("?")[0].endswith(".tsv") else ","


def _csv_rows(path: str, text: str, separator: str) -> Iterator[tuple[int, dict]]:
    reader = csv.DictReader(io.StringIO(text), delimiter=separator)
    for row in reader:
        yield reader.line_num, row


def _jsonl_rows(path: str, text: str) -> Iterator[tuple[int, dict]]:
    for line_no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield line_no, formats.json_object(line)
        except ValueError as exc:
            raise DataError(f"{path}:{line_no}: {exc}") from None


def _id(value: Any, default: str) -> formats.Id:
    """An id column's value: JSON ints stay ints, CSV text that is a canonical decimal becomes one (as LMDB keys)."""
    if value is None or value == "":
        return default
    return formats.image_id_from_key(value, "auto") if isinstance(value, str) else value


def read_records(
    path: str,
    img_key: str = DEFAULT_IMG_KEY,
    caption_key: str = DEFAULT_CAPTION_KEY,
    separator: str | None = None,
    need_captions: bool = True,
) -> list[tuple[str, formats.Id, formats.Id, str]]:
    """Every pair of a list file as ``(image location, image_id, text_id, caption)``, in file order. With
    ``need_captions=False`` (reading images only) the caption column may be absent: one record per row, caption ""."""
    try:
        text = read_bytes(path).decode("utf-8-sig")
    except FileNotFoundError:
        raise DataError(f"{path}: no such list file") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    jsonl = path.lower().split("?")[0].endswith((".jsonl", ".json"))
    rows = _jsonl_rows(path, text) if jsonl else _csv_rows(path, text, separator or default_separator(path))
    records = []
    for line_no, row in rows:
        for key in (img_key, caption_key) if need_captions else (img_key,):
            if key not in row or row[key] in (None, ""):
                columns = ", ".join(map(str, row)) or "none"
                hint = "see --csv-img-key/--csv-caption-key"
                raise DataError(f"{path}:{line_no}: no {key!r} value (columns: {columns}; {hint})")
        captions = row[caption_key] if need_captions else ""
        captions = [captions] if isinstance(captions, str) else captions
        if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions) or not captions:
            raise DataError(f"{path}:{line_no}: {caption_key!r} must be a caption or a list of captions")
        location = resolve(path, str(row[img_key]))
        image_id = _id(row.get("image_id"), str(row[img_key]))
        for position, caption in enumerate(captions):
            text_id = _id(row.get("text_id"), f"{line_no}" if len(captions) == 1 else f"{line_no}:{position}")
            records.append((location, image_id, text_id, caption))
    if not records:
        raise DataError(f"{path}: the list holds no image-caption pairs")
    return records


class FileListDataset(PairReader):
    """Pairs of a CSV/TSV/JSONL list of image files, read by index like :class:`LMDBDataset` (same items, same
    sampler, same ``on_bad_sample`` policy); images are opened when read, never checked up front."""

    def __init__(
        self,
        path: str,
        split: str = "val",
        max_txt_length: int = 52,
        transform: Callable | None = None,
        on_bad_sample: str = "fail",
        img_key: str = DEFAULT_IMG_KEY,
        caption_key: str = DEFAULT_CAPTION_KEY,
        separator: str | None = None,
        tokenizer: Any = None,
    ) -> None:
        from cn_clip.data.lmdb_dataset import _default_transform

        check_on_bad_sample(on_bad_sample)
        self.source = path
        self.split = split
        self.records = read_records(path, img_key, caption_key, separator)
        self.number_samples = self.dataset_len = len(self.records)
        self.max_txt_length = max_txt_length
        self.transform = transform if transform is not None else _default_transform(224)
        self.on_bad_sample = on_bad_sample
        self.skipped = 0
        self.tokenizer = tokenizer  # the architecture's (cn_clip.tokenizer.get_tokenizer); None = Chinese WordPiece
        _logger.info("%s list %s holds %d pairs.", split, path, self.number_samples)

    def read_pair(self, sample: int) -> tuple[formats.Id, formats.Id, str]:
        _location, image_id, text_id, text = self.records[sample]
        return image_id, text_id, text

    def read_image(self, image_id: formats.Id, location: str | None = None) -> Any:
        return open_image(location or str(image_id), image_id)

    def _load(self, sample: int) -> tuple[Any, Any, int]:
        location, image_id, _text_id, text = self.records[sample]
        raw = self.read_image(image_id, location)
        return encode_pair(raw, text, self.transform, self.max_txt_length, image_id, self.tokenizer)
