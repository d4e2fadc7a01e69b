"""Training/validation data for ``cn_clip.training``: ``get_data(DataCfg, world_size, rank, resolution)`` → splits.

Same sample order as the reference (compatibility.md#training-data): the split is padded up to a multiple of the global
batch,
``DistributedSampler(shuffle=True, seed=--seed)`` with the epoch id (0 for validation), ``num_batches`` per rank.
Additions:
- the sampler can start at any batch of an epoch (exact mid-epoch resume) without reading the skipped samples;
- every item gets its own seed from ``(seed, epoch, position)``, so random augmentation is identical however many
  workers there are and wherever a run was resumed;
- items carry 63-bit keys of their image id and text id, for masking duplicate positives in the loss;
- the loader is built once (persistent workers), not per epoch (compatibility.md#fix-data-plumbing).
``--train-data synthetic:N[:C]`` trains on ``N`` random pairs (``C`` classes, see SyntheticDataset), no files needed.

``--dataset-type`` picks the reader (:func:`resolve_dataset_type`): ``lmdb``, ``csv``/``jsonl`` (a list of image files,
data/filelist.py: the same sampler and items as LMDB) or ``webdataset`` (data/wds_dataset.py: a stream of batches
whose ``set_epoch``/``set_start`` stand in for the sampler). docs/data.md compares the three.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Iterator
from typing import Any

from cn_clip.errors import ConfigError

_logger = logging.getLogger(__name__)
SYNTHETIC_PREFIX = "synthetic:"


def key_hash(value: Any) -> int:
    """A stable non-negative 63-bit id for an image/text id of any type (ints and strings alike)."""
    return int.from_bytes(hashlib.blake2b(str(value).encode("utf-8"), digest_size=8).digest(), "little") >> 1


class ResumableSampler:
    """``DistributedSampler(shuffle=True, seed)`` order of this rank, as ``(index, item_seed)``, from ``start``."""

    def __init__(self, dataset_len: int, num_replicas: int, rank: int, seed: int, shuffle: bool = True) -> None:
        self.dataset_len = dataset_len
        self.shuffle = shuffle
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def set_start(self, start: int) -> None:
        """Skip the first ``start`` samples of this rank's epoch (used once after a mid-epoch resume)."""
        self.start = start

    def indices(self) -> list[int]:
        from torch.utils.data import DistributedSampler

        sampler = DistributedSampler(
            range(self.dataset_len), self.num_replicas, self.rank, shuffle=self.shuffle, seed=self.seed
        )
        sampler.set_epoch(self.epoch)
        return list(sampler)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        base = (self.seed * 1_000_003 + self.epoch) * 1_000_000_007
        for pos, index in enumerate(self.indices()):
            if pos >= self.start:
                global_pos = pos * self.num_replicas + self.rank
                yield index, (base + global_pos) % (2**63 - 1)
        self.start = 0

    def __len__(self) -> int:
        return -(-self.dataset_len // self.num_replicas) - self.start


DATASET_TYPES = ("auto", "lmdb", "webdataset", "csv", "jsonl")
_LIST_SUFFIXES = {".csv": "csv", ".tsv": "csv", ".jsonl": "jsonl", ".json": "jsonl"}


def resolve_dataset_type(path: str, dataset_type: str = "auto") -> str:
    """``auto`` → ``lmdb`` (a dir with ``imgs/`` and ``pairs/``), ``webdataset`` (``*.tar``, a brace pattern, ``::``
    sources, a shard list ``.txt``/``.shards``, ``pipe:`` or another URL), ``csv``/``jsonl`` (by suffix);
    ``synthetic`` for ``synthetic:N``. An explicit type is returned as given."""
    import os

    if path.startswith(SYNTHETIC_PREFIX):
        return "synthetic"
    if dataset_type not in DATASET_TYPES:
        raise ConfigError(f"--dataset-type must be one of {', '.join(DATASET_TYPES)}, got {dataset_type!r}")
    if dataset_type != "auto":
        return dataset_type
    bare = path.split("?", 1)[0].rstrip("/").lower()
    suffix = os.path.splitext(bare)[1]
    if suffix in _LIST_SUFFIXES:
        return _LIST_SUFFIXES[suffix]
    if "::" in path or "{" in path or bare.endswith((".tar", ".tar.gz", ".tgz", ".txt", ".shards")):
        return "webdataset"
    if path.startswith("pipe:") or "://" in path and not path.startswith("file://"):
        return "webdataset"
    if os.path.isdir(os.path.join(path, "imgs")) and os.path.isdir(os.path.join(path, "pairs")):
        return "lmdb"
    if os.path.isdir(path):
        raise ConfigError(f"{path}: a directory without imgs/ and pairs/ is no LMDB split (pass --dataset-type?)")
    raise ConfigError(f"{path}: cannot tell the dataset type from the path; pass --dataset-type")


class KeyedPairs:
    """Wraps a pair dataset: item ``(index, item_seed)`` → ``(image, text_ids, eos_index, image_key, text_key)``."""

    def __init__(self, dataset: Any, random_transform: bool = False) -> None:
        self.dataset = dataset
        self.random_transform = random_transform

    def __len__(self) -> int:
        return len(self.dataset)

    def _keys(self, index: int, text_ids: Any) -> tuple[int, int]:
        read_pair = getattr(self.dataset, "read_pair", None)
        if read_pair is not None:
            image_id, text_id, _ = read_pair(index % self.dataset.number_samples)
            return key_hash(("img", image_id)), key_hash(("txt", text_id))
        # synthetic data: one image per index; identical token ids are the same text
        return key_hash(("img", index % self.dataset.num_samples)), key_hash(("txt", text_ids.tolist()))

    def __getitem__(self, item: tuple[int, int]) -> tuple[Any, ...]:
        from cn_clip.data.wds_dataset import with_item_seed

        index, item_seed = item
        image, text, eos = with_item_seed(item_seed if self.random_transform else None, lambda: self.dataset[index])
        image_key, text_key = self._keys(index, text)
        return image, text, eos, image_key, text_key


@dataclasses.dataclass(frozen=True)
class SplitCfg:
    """One split: where its pairs are and how they are batched."""

    path: str  # LMDB split dir, shard pattern/URL/list, CSV/JSONL list of files, or synthetic:N[:C]
    batch_size: int  # per process
    num_workers: int = 0  # DataLoader reader processes
    augment: bool = False  # random training augmentation
    num_samples: int | None = None  # WebDataset: samples per epoch (None: the shards' total)


@dataclasses.dataclass(frozen=True)
class DataCfg:
    """What :func:`get_data` builds: the training split, an optional validation split, and what both share."""

    train: SplitCfg
    val: SplitCfg | None = None
    context_length: int = 52  # tokens incl. [CLS]/[SEP]
    seed: int = 123  # the sampler's shuffle and the per-item augmentation seeds
    on_bad_sample: str = "fail"  # an unreadable pair: "fail" or "skip"
    dataset_type: str = "auto"  # see resolve_dataset_type
    shuffle: bool = True  # off: every reader keeps the stored order (LMDB/list: index order; shards: as listed)
    resampled: bool = False  # WebDataset: shards drawn with replacement, per-epoch seed
    upsampling_factors: tuple[float, ...] | None = None  # WebDataset: weight of each ::-joined source
    shuffle_window: int = 1000  # WebDataset: samples shuffled together
    csv_img_key: str = "filepath"
    csv_caption_key: str = "title"
    csv_separator: str | None = None  # None: "," for .csv, tab for .tsv
    tokenizer: Any = None  # the architecture's (cn_clip.tokenizer.get_tokenizer); None = Chinese WordPiece


@dataclasses.dataclass
class DataInfo:
    dataloader: Any
    sampler: ResumableSampler
    dataset: Any
    num_samples: int  # padded length of the split (all ranks)
    num_batches: int  # batches per rank per epoch
    batch_size: int


def _build_dataset(name: str, split: SplitCfg, cfg: DataCfg, kind: str, transform: Any, resolution: int) -> Any:
    path = split.path
    if kind == "synthetic":
        from cn_clip.data.synthetic import SyntheticDataset

        parts = path[len(SYNTHETIC_PREFIX) :].split(":")
        try:
            count, classes = int(parts[0]), int(parts[1]) if len(parts) > 1 else 0
        except ValueError:
            raise ConfigError(f"{path!r}: use synthetic:N or synthetic:N:CLASSES") from None
        return SyntheticDataset(
            count, resolution, cfg.context_length, seed=0, num_classes=classes, tokenizer=cfg.tokenizer
        )
    if kind in ("csv", "jsonl"):
        from cn_clip.data.filelist import FileListDataset

        return FileListDataset(
            path, name, cfg.context_length, transform, cfg.on_bad_sample,
            cfg.csv_img_key, cfg.csv_caption_key, cfg.csv_separator, cfg.tokenizer,
        )  # fmt: skip
    from cn_clip.data.lmdb_dataset import LMDBDataset

    return LMDBDataset(
        path, name, cfg.context_length, transform=transform, on_bad_sample=cfg.on_bad_sample, tokenizer=cfg.tokenizer
    )


def _build_stream(name: str, split: SplitCfg, cfg: DataCfg, world_size: int, rank: int, transform: Any) -> DataInfo:
    from torch.utils.data import DataLoader

    from cn_clip.data.wds_dataset import WdsCfg, WebDatasetPairs

    train = name == "train"
    wds_cfg = WdsCfg(
        split.path, name, split.batch_size, world_size, rank,
        num_samples=split.num_samples,
        resampled=cfg.resampled and train,
        factors=cfg.upsampling_factors if train else None,
        shuffle=cfg.shuffle and train,
        shuffle_window=cfg.shuffle_window,
        seed=cfg.seed,
        context_length=cfg.context_length,
        tokenizer=cfg.tokenizer,
        on_bad_sample=cfg.on_bad_sample,
        random_transform=split.augment,
    )  # fmt: skip
    dataset = WebDatasetPairs(wds_cfg, transform)
    # batch_size=None: the dataset yields whole batches; fresh workers each epoch carry its epoch and start
    loader = DataLoader(dataset, batch_size=None, num_workers=split.num_workers, pin_memory=False)
    return DataInfo(loader, dataset, dataset, dataset.num_samples, dataset.num_batches, split.batch_size)


def build_split(name: str, split: SplitCfg, cfg: DataCfg, world_size: int, rank: int, resolution: int) -> DataInfo:
    """The loader of split ``name`` ("train" or "val") for this rank, at the model's image ``resolution``."""
    from torch.utils.data import DataLoader

    from cn_clip.transforms import image_transform, train_transform

    kind = resolve_dataset_type(split.path, cfg.dataset_type)
    transform = train_transform(resolution) if split.augment else image_transform(resolution)
    if kind == "webdataset":
        return _build_stream(name, split, cfg, world_size, rank, transform)
    stream_only = {
        "--train-num-samples/--val-num-samples": split.num_samples is not None,
        "--dataset-resampled": cfg.resampled and name == "train",
        "--train-data-upsampling-factors": cfg.upsampling_factors is not None and name == "train",
    }
    for flag, given in stream_only.items():
        if given:
            raise ConfigError(f"{flag} applies to WebDataset shards; {split.path} is {kind} data")
    dataset = _build_dataset(name, split, cfg, kind, transform, resolution)
    global_batch = split.batch_size * world_size
    real = len(dataset)
    padded = -(-real // global_batch) * global_batch
    dataset.dataset_len = padded  # the tail wraps to the start (items are index % num_samples)
    if real < global_batch:
        _logger.warning(
            "%s split has %d pairs, fewer than the global batch %d: padding repeats pairs inside a batch",
            name,
            real,
            global_batch,
        )
    sampler = ResumableSampler(padded, world_size, rank, cfg.seed, shuffle=cfg.shuffle)
    loader = DataLoader(
        KeyedPairs(dataset, random_transform=split.augment),
        batch_size=split.batch_size,
        sampler=sampler,
        num_workers=split.num_workers,
        pin_memory=False,
        persistent_workers=split.num_workers > 0,
        drop_last=False,
    )
    return DataInfo(loader, sampler, dataset, padded, padded // global_batch, split.batch_size)


def get_data(cfg: DataCfg, world_size: int, rank: int, resolution: int) -> dict[str, DataInfo]:
    """The reference's ``get_data``: ``train`` (and ``val`` when ``cfg.val`` is set)."""
    data = {"train": build_split("train", cfg.train, cfg, world_size, rank, resolution)}
    if cfg.val is not None:
        data["val"] = build_split("val", cfg.val, cfg, world_size, rank, resolution)
    return data
