"""Datasets over the reference's LMDB layout (compatibility.md#training-data, #eval-data) and over raw JSONL texts.

LMDB environments are opened lazily, once per process, on the first item read: a DataLoader forks its workers before
any handle exists (the reference opened them in ``__init__`` and shared them across fork). Items are read by index.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cn_clip.data import formats
from cn_clip.errors import ConfigError, DataError

_logger = logging.getLogger(__name__)

SEP_ID = 102
ON_BAD_SAMPLE = ("fail", "skip")
_MAX_SKIPS = 100


# lmdb refuses to open one environment twice in a process, so read-only handles are shared per process and path.
# A handle inherited through fork is closed in the child (never used there) and reopened; a rebuilt LMDB (new data
# file at the same path) gets a fresh handle.
_ENVS: dict[str, tuple[int, tuple[int, int], Any]] = {}


def _open_env(path: Path) -> Any:
    import lmdb

    name = os.path.realpath(path)
    stat = os.stat(os.path.join(name, "data.mdb"))
    identity = (stat.st_dev, stat.st_ino)
    cached = _ENVS.get(name)
    if cached is not None:
        if cached[0] == os.getpid() and cached[1] == identity:
            return cached[2]
        cached[2].close()
    env = lmdb.open(name, readonly=True, create=False, lock=False, readahead=False, meminit=False)
    _ENVS[name] = (os.getpid(), identity, env)
    return env


def _read_count(path: Path, key: bytes) -> int:
    with _open_env(path).begin() as txn:
        raw = txn.get(key)
    if raw is None:
        raise DataError(f"{path}: LMDB has no {key.decode()!r} key (not built by build_lmdb_dataset?)")
    try:
        return int(raw.decode("utf-8"))
    except ValueError:
        raise DataError(f"{path}: {key.decode()!r} is {raw[:40]!r}, not a number") from None


def decode_image(b64: bytes | memoryview, image_id: Any = "?") -> Any:
    """base64 (standard or URL-safe) → PIL image; DataError naming the id when it is not an image."""
    import binascii

    from PIL import Image

    try:
        raw = formats.b64decode_image(bytes(b64))
        return Image.open(io.BytesIO(raw))
    except (binascii.Error, ValueError, OSError) as exc:
        raise DataError(f"image_id {image_id}: cannot decode image ({type(exc).__name__}: {exc})") from None


class _LazyEnvs:
    """Per-process LMDB handles, (re)opened when first used in a process (after a DataLoader fork)."""

    def __init__(self, **paths: Path) -> None:
        self._paths = paths
        self._pid: int | None = None
        self._envs: dict[str, Any] = {}
        self._txns: dict[str, Any] = {}

    def txn(self, name: str) -> Any:
        if self._pid != os.getpid():
            self._envs = {key: _open_env(path) for key, path in self._paths.items()}
            self._txns = {key: env.begin(buffers=True) for key, env in self._envs.items()}
            self._pid = os.getpid()
        return self._txns[name]

    def close(self) -> None:
        if self._pid == os.getpid():
            for txn in self._txns.values():
                txn.abort()
        self._envs, self._txns, self._pid = {}, {}, None

    def __getstate__(self) -> dict:
        return {"_paths": self._paths, "_pid": None, "_envs": {}, "_txns": {}}


def _default_transform(resolution: int) -> Callable:
    from cn_clip.transforms import image_transform

    return image_transform(resolution)


class PairReader:
    """What every map-style pair reader shares: item ``index`` → ``(image, text ids, eos_index)`` for pair
    ``index % number_samples``, text normalised then tokenised as the reference, and the ``on_bad_sample`` policy.

    Subclasses set ``source`` (named in messages), ``split``, ``max_txt_length``, ``number_samples``, ``transform``,
    ``on_bad_sample`` and implement ``read_pair(sample)`` → ``(image_id, text_id, text)`` and ``read_image(image_id)``
    → PIL image. ``on_bad_sample``: ``fail`` raises DataError naming the pair and image id; ``skip`` logs it, counts
    it in ``skipped`` and returns the next readable pair instead.
    """

    source: Any
    split: str
    max_txt_length: int
    number_samples: int
    dataset_len: int
    transform: Callable
    on_bad_sample: str
    skipped: int = 0
    tokenizer: Any = None  # the architecture's (cn_clip.tokenizer.get_tokenizer); None = Chinese WordPiece

    def __len__(self) -> int:
        return self.dataset_len

    def read_pair(self, sample: int) -> tuple[formats.Id, formats.Id, str]:
        raise NotImplementedError

    def read_image(self, image_id: formats.Id) -> Any:
        raise NotImplementedError

    def _load(self, sample: int) -> tuple[Any, Any, int]:
        image_id, _text_id, text = self.read_pair(sample)
        raw = self.read_image(image_id)
        return encode_pair(raw, text, self.transform, self.max_txt_length, image_id, self.tokenizer)

    def __getitem__(self, index: int) -> tuple[Any, Any, int]:
        sample = index % self.number_samples
        for attempt in range(_MAX_SKIPS + 1):
            try:
                return self._load((sample + attempt) % self.number_samples)
            except DataError as exc:
                if self.on_bad_sample == "fail":
                    raise DataError(f"{self.split} pair {(sample + attempt) % self.number_samples}: {exc}") from None
                self.skipped += 1
                _logger.warning("skipping bad sample (%d so far): %s", self.skipped, exc)
        raise DataError(f"{self.source}: {_MAX_SKIPS} bad samples in a row after pair {sample}; giving up")


def encode_pair(
    raw: Any, text: str, transform: Callable, context_length: int, image_id: Any, tokenizer: Any = None
) -> tuple[Any, Any, int]:
    """A PIL image and its caption → ``(image tensor, text ids, eos_index)``, as every reader returns them.

    ``tokenizer``: the architecture's (:func:`cn_clip.tokenizer.get_tokenizer`); None is the reference's Chinese
    WordPiece, whose eos is ``[SEP]``; for another tokenizer it is the last real token."""
    from cn_clip.tokenizer import get_tokenizer

    try:  # pixels are decoded lazily, inside the transform: a truncated file fails here
        image = transform(raw)
    except DataError as exc:
        raise DataError(f"image_id {image_id}: {exc}") from None
    chosen = tokenizer or get_tokenizer()
    ids = chosen([chosen.normalize(text)], context_length)[0]
    if tokenizer is None:
        return image, ids, int((ids == SEP_ID).nonzero()[0, 0])
    return image, ids, int((ids != tokenizer.pad_id).nonzero()[-1, 0])


def check_on_bad_sample(value: str) -> None:
    if value not in ON_BAD_SAMPLE:
        raise ConfigError(f"on_bad_sample must be one of {ON_BAD_SAMPLE}, got {value!r}")


class LMDBDataset(PairReader):
    """Training/validation pairs of a split dir (``…/lmdb/train`` with ``pairs/`` and ``imgs/``).

    Item ``index`` → ``(image [3,R,R], text ids [context_length], eos_index)`` for pair ``index % num_samples``,
    text normalised (lowercase, curly quotes) then tokenised, as the reference. ``dataset_len`` may be padded to a
    multiple of the global batch with :func:`pad_dataset`; the tail wraps to the start.

    ``on_bad_sample``: see :class:`PairReader`.
    """

    def __init__(
        self,
        lmdb_path: str | os.PathLike,
        split: str = "val",
        max_txt_length: int = 52,
        transform: Callable | None = None,
        resolution: int = 224,
        on_bad_sample: str = "fail",
        tokenizer: Any = None,
    ) -> None:
        path = Path(lmdb_path)
        self.tokenizer = tokenizer  # the architecture's (cn_clip.tokenizer.get_tokenizer); None = Chinese WordPiece
        check_on_bad_sample(on_bad_sample)
        if not path.is_dir():
            raise DataError(f"The LMDB directory {path} of {split} split does not exist!")
        pairs, imgs = path / "pairs", path / "imgs"
        if not pairs.is_dir():
            raise DataError(f"The LMDB directory {pairs} of {split} image-text pairs does not exist!")
        if not imgs.is_dir():
            raise DataError(f"The LMDB directory {imgs} of {split} image base64 strings does not exist!")
        self.lmdb_path = self.source = path
        self.split = split
        self.max_txt_length = max_txt_length
        self.number_samples = _read_count(pairs, formats.NUM_SAMPLES_KEY)
        self.number_images = _read_count(imgs, formats.NUM_IMAGES_KEY)
        if self.number_samples <= 0:
            raise DataError(f"{pairs}: the split holds no image-text pairs")
        _logger.info("%s LMDB file contains %d images and %d pairs.", split, self.number_images, self.number_samples)
        self.dataset_len = self.number_samples
        self.global_batch_size = 1
        self.transform = transform if transform is not None else _default_transform(resolution)
        self.on_bad_sample = on_bad_sample
        self.skipped = 0
        self._envs = _LazyEnvs(pairs=pairs, imgs=imgs)

    def read_pair(self, sample: int) -> tuple[formats.Id, formats.Id, str]:
        """The raw ``(image_id, text_id, text)`` record at ``sample`` (0 ≤ sample < number_samples)."""
        key = str(sample)
        raw = self._envs.txn("pairs").get(key.encode("utf-8"))
        if raw is None:
            raise DataError(f"{self.lmdb_path / 'pairs'}: key {key} missing (num_samples is {self.number_samples})")
        return formats.loads_pair(raw, key)

    def read_image(self, image_id: formats.Id) -> Any:
        """PIL image stored under ``str(image_id)`` (ids may be ints or strings)."""
        b64 = self._envs.txn("imgs").get(str(image_id).encode("utf-8"))
        if b64 is None:
            raise DataError(f"image_id {image_id} not found in {self.lmdb_path / 'imgs'}")
        return decode_image(b64, image_id)

    def close(self) -> None:
        self._envs.close()

    def __del__(self) -> None:
        envs = getattr(self, "_envs", None)
        if envs is not None:
            envs.close()


def pad_dataset(dataset: LMDBDataset, global_batch_size: int) -> None:
    """Round ``len(dataset)`` up to a multiple of the global batch (the tail wraps), as the reference."""
    dataset.dataset_len = -(-dataset.dataset_len // global_batch_size) * global_batch_size
    dataset.global_batch_size = global_batch_size


class LMDBImageDataset:
    """Evaluation images of an ``imgs`` LMDB: ``(image_id, image tensor)`` in LMDB byte-lexicographic key order.

    That order (``"10"`` before ``"9"``) is the reference's, and feature files and top-k ties depend on it.
    ``id_type`` chooses how keys become ids (see :func:`cn_clip.data.formats.image_id_from_key`): ``auto`` keeps
    strings such as ``"007"`` or ``"a1"`` as strings and canonical decimals as ints; ``int`` is the reference's rule.
    """

    def __init__(
        self,
        lmdb_imgs: str | os.PathLike,
        transform: Callable | None = None,
        resolution: int = 224,
        id_type: str = "auto",
    ) -> None:
        path = Path(lmdb_imgs)
        if not path.is_dir():
            raise DataError(f"The image LMDB directory {path} not exists!")
        with _open_env(path).begin() as txn:
            keys = [bytes(key) for key in txn.cursor().iternext(keys=True, values=False)]
        self.keys = [key for key in keys if key != formats.NUM_IMAGES_KEY]
        self.ids = [formats.image_id_from_key(key, id_type) for key in self.keys]
        _logger.info("The specified LMDB directory contains %d images.", len(self.keys))
        self.lmdb_path = path
        self.transform = transform if transform is not None else _default_transform(resolution)
        self._envs = _LazyEnvs(imgs=path)

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index: int) -> tuple[formats.Id, Any]:
        key = self.keys[index]
        b64 = self._envs.txn("imgs").get(key)
        if b64 is None:
            raise DataError(f"image key {key.decode('utf-8')} vanished from {self.lmdb_path}")
        return self.ids[index], self.transform(decode_image(b64, self.ids[index]))

    def __del__(self) -> None:
        envs = getattr(self, "_envs", None)
        if envs is not None:
            envs.close()


class JsonlTextDataset:
    """Evaluation texts of a ``{split}_texts.jsonl``: ``(text_id, token ids)`` in file order.

    Only ``text_id`` and ``text`` are needed (``image_ids`` may be absent); ids keep their JSON type.
    """

    def __init__(self, path: str | os.PathLike, context_length: int = 52, tokenizer: Any = None) -> None:
        import json

        path = Path(path)
        if not path.is_file():
            raise DataError(f"The annotation datafile {path} not exists!")
        self.records: list[tuple[formats.Id, str]] = []
        for line_no, line in formats.iter_text_lines(path):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path.name}:{line_no}: invalid JSON ({exc.msg})") from None
            if not isinstance(obj, dict) or "text_id" not in obj or not isinstance(obj.get("text"), str):
                raise DataError(f"{path.name}:{line_no}: needs a text_id and a string text")
            self.records.append((obj["text_id"], obj["text"]))
        self.context_length = context_length
        self.tokenizer = tokenizer  # the architecture's; None = Chinese WordPiece

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[formats.Id, Any]:
        from cn_clip.tokenizer import get_tokenizer

        text_id, text = self.records[index]
        tokenizer = self.tokenizer or get_tokenizer()
        return text_id, tokenizer([tokenizer.normalize(text)], self.context_length)[0]
