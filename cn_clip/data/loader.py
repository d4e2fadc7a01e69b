"""Training/validation data for ``cn_clip.training``: ``get_data(DataCfg, world_size, rank, resolution)`` → splits.

Same sample order as the reference (SPEC §6.3): the split is padded up to a multiple of the global batch,
``DistributedSampler(shuffle=True, seed=--seed)`` with the epoch id (0 for validation), ``num_batches`` per rank.
Additions:
- the sampler can start at any batch of an epoch (exact mid-epoch resume) without reading the skipped samples;
- every item gets its own seed from ``(seed, epoch, position)``, so random augmentation is identical however many
  workers there are and wherever a run was resumed;
- items carry 63-bit keys of their image id and text id, for masking duplicate positives in the loss;
- the loader is built once (persistent workers), not per epoch (SPEC 12.21).
``--train-data synthetic:N[:C]`` trains on ``N`` random pairs (``C`` classes, see SyntheticDataset), no files needed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import random
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

    def __init__(self, dataset_len: int, num_replicas: int, rank: int, seed: int) -> None:
        self.dataset_len = dataset_len
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
            range(self.dataset_len), num_replicas=self.num_replicas, rank=self.rank, shuffle=True, seed=self.seed
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
        import torch

        index, item_seed = item
        if self.random_transform:
            state = random.getstate()
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(item_seed)
                random.seed(item_seed)
                image, text, eos = self.dataset[index]
            random.setstate(state)
        else:
            image, text, eos = self.dataset[index]
        image_key, text_key = self._keys(index, text)
        return image, text, eos, image_key, text_key


@dataclasses.dataclass(frozen=True)
class SplitCfg:
    """One split: where its pairs are and how they are batched."""

    path: str  # LMDB split directory, or synthetic:N[:C]
    batch_size: int  # per process
    num_workers: int = 0  # DataLoader reader processes
    augment: bool = False  # random training augmentation


@dataclasses.dataclass(frozen=True)
class DataCfg:
    """What :func:`get_data` builds: the training split, an optional validation split, and what both share."""

    train: SplitCfg
    val: SplitCfg | None = None
    context_length: int = 52  # tokens incl. [CLS]/[SEP]
    seed: int = 123  # the sampler's shuffle and the per-item augmentation seeds
    on_bad_sample: str = "fail"  # an unreadable pair: "fail" or "skip"
    tokenizer: Any = None  # the architecture's (cn_clip.tokenizer.get_tokenizer); None = Chinese WordPiece


@dataclasses.dataclass
class DataInfo:
    dataloader: Any
    sampler: ResumableSampler
    dataset: Any
    num_samples: int  # padded length of the split (all ranks)
    num_batches: int  # batches per rank per epoch
    batch_size: int


def _build_dataset(
    path: str, split: str, resolution: int, context_length: int, augment: bool, on_bad: str, tokenizer: Any = None
) -> Any:
    if path.startswith(SYNTHETIC_PREFIX):
        from cn_clip.data.synthetic import SyntheticDataset

        parts = path[len(SYNTHETIC_PREFIX) :].split(":")
        try:
            count, classes = int(parts[0]), int(parts[1]) if len(parts) > 1 else 0
        except ValueError:
            raise ConfigError(f"{path!r}: use synthetic:N or synthetic:N:CLASSES") from None
        return SyntheticDataset(count, resolution, context_length, seed=0, num_classes=classes, tokenizer=tokenizer)
    from cn_clip.data.lmdb_dataset import LMDBDataset
    from cn_clip.transforms import image_transform, train_transform

    transform = train_transform(resolution) if augment else image_transform(resolution)
    return LMDBDataset(path, split, context_length, transform=transform, on_bad_sample=on_bad, tokenizer=tokenizer)


def build_split(name: str, split: SplitCfg, cfg: DataCfg, world_size: int, rank: int, resolution: int) -> DataInfo:
    """The loader of split ``name`` ("train" or "val") for this rank, at the model's image ``resolution``."""
    from torch.utils.data import DataLoader

    dataset = _build_dataset(
        split.path, name, resolution, cfg.context_length, split.augment, cfg.on_bad_sample, cfg.tokenizer
    )
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
    sampler = ResumableSampler(padded, world_size, rank, cfg.seed)
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
