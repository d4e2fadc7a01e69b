"""Training/validation pairs streamed from WebDataset ``.tar`` shards, on local disk or behind any fsspec URL.

A sample is ``{key}.jpg|jpeg|png|webp`` plus ``{key}.json`` (``{"text", "text_id", "image_id"}``; the ids default
to the key) or ``{key}.txt`` (the caption). Shards are named by brace patterns (``shards/{00000..00127}.tar``), a list
file (``.txt``/``.shards``: one shard per line, relative to the list), ``pipe:CMD`` or any fsspec URL; several
sources are joined with ``::``.

Every epoch is one fixed sequence of positions, cut into per-rank ranges and per-worker runs of whole batches, so
there is no sample twice in an epoch (only the tail padding repeats, as with LMDB) and any batch can be found again:

1. The shard order of epoch ``e``: all shards (shuffled with ``(seed, e)`` unless shuffling is off), repeated if
   ``--train-num-samples`` asks for more; or, with ``--dataset-resampled``, shards drawn with replacement from
   ``(seed, e)``, weighted by each source's ``--train-data-upsampling-factors``, until the epoch is full.
2. The samples of that order, shuffled inside windows of ``shuffle_window`` consecutive samples (off: kept).
3. Rank ``r`` takes positions ``[r·n, (r+1)·n)``, ``n = num_batches · batch_size``; its batches are dealt to the
   DataLoader workers in contiguous runs, in the order the DataLoader's round robin hands them out, so each worker
   reads its shards front to back, and a resume at batch ``k`` opens each shard at the right offset.

The sample counts come from ``index.json`` (written by ``cn_clip.preprocess.build_webdataset``) or open_clip's
``sizes.json`` beside the shards, or from one counting pass over shards that have neither (with a warning).
A stream that breaks is reopened at the same sample up to ``RETRIES`` times, each retry logged and counted; after
that the run stops with the shard and offset named (``--on-bad-sample skip``: the rest of that shard is replaced by
repeats, logged and counted). A sample that cannot be decoded follows ``--on-bad-sample``.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import logging
import random
import tarfile
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import IterableDataset, get_worker_info

from cn_clip.data.filelist import is_url, read_bytes, resolve
from cn_clip.data.lmdb_dataset import check_on_bad_sample, encode_pair
from cn_clip.errors import ConfigError, DataError

_logger = logging.getLogger(__name__)
INDEX_NAME = "index.json"
SIZES_NAME = "sizes.json"  # open_clip's {shard name: count}
LIST_SUFFIXES = (".txt", ".shards")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
RETRIES = 3
_STREAM_ERRORS = (OSError, tarfile.TarError, EOFError, ValueError)


def _require_wds() -> Any:
    from cn_clip.extras import require

    return require("webdataset", "--dataset-type webdataset")


# ------------------------------------------------------------------------------------------------------ shard lists


def expand_source(source: str) -> list[str]:
    """One source (no ``::``) → its shard URLs: a list file's lines or the brace expansion."""
    if source.lower().endswith(LIST_SUFFIXES):
        try:
            lines = read_bytes(source).decode("utf-8").splitlines()
        except FileNotFoundError:
            raise DataError(f"{source}: no such shard list") from None
        urls = [resolve(source, line.strip()) for line in lines if line.strip() and not line.startswith("#")]
    else:
        from webdataset.shardlists import expand_urls

        _require_wds()
        urls = expand_urls(source)
    if not urls:
        raise DataError(f"{source}: names no shard")
    return urls


def open_stream(url: str) -> Any:
    """A binary stream of ``url``: ``pipe:CMD`` (webdataset's gopen), an fsspec URL, or a local path."""
    if url.startswith("pipe:"):
        from webdataset.gopen import gopen

        _require_wds()
        return gopen(url, "rb")
    if is_url(url):
        from cn_clip.extras import require

        try:
            return require("fsspec", f"reading {url}").open(url, "rb").open()
        except ImportError as exc:  # the URL's filesystem needs a package (aiohttp for http, s3fs for s3, ...)
            raise ConfigError(f"{url}: {exc}") from None
    return open(url.removeprefix("file://"), "rb")


def iter_samples(url: str) -> Iterator[dict]:
    """The samples of one shard in order: ``{"__key__", ext: bytes, ...}`` (webdataset's tar grouping)."""
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    _require_wds()
    stream = open_stream(url)
    try:
        files = ({**item, "__url__": url} for item in tar_file_iterator(stream))
        yield from group_by_keys(files)
    finally:
        stream.close()


def _parent(url: str) -> str:
    return url.rsplit("/", 1)[0] if "/" in url else "."


def _index_counts(parent: str) -> dict[str, int] | None:
    for name in (INDEX_NAME, SIZES_NAME):
        location = f"{parent}/{name}"
        try:
            payload = json.loads(read_bytes(location))
        except FileNotFoundError:
            continue
        except (OSError, ValueError) as exc:
            raise DataError(f"{location}: unreadable ({type(exc).__name__}: {exc})") from None
        if name == INDEX_NAME:
            return {shard["name"]: int(shard["count"]) for shard in payload["shards"]}
        return {str(key): int(value) for key, value in payload.items()}
    return None


def shard_counts(urls: Sequence[str]) -> list[int]:
    """Samples per shard, from ``index.json``/``sizes.json`` beside each shard, else by counting (slow for URLs)."""
    indexes: dict[str, dict[str, int] | None] = {}
    counts = []
    for url in urls:
        parent = "" if url.startswith("pipe:") else _parent(url)
        if parent not in indexes:
            indexes[parent] = _index_counts(parent) if parent else None
        known = indexes[parent]
        name = url.rsplit("/", 1)[-1]
        if known is not None and name in known:
            counts.append(known[name])
            continue
        _logger.warning("%s: not in any %s/%s beside it: counting its samples", url, INDEX_NAME, SIZES_NAME)
        try:
            counts.append(sum(1 for _ in iter_samples(url)))
        except _STREAM_ERRORS as exc:
            raise DataError(f"{url}: cannot count its samples ({type(exc).__name__}: {exc})") from None
    return counts


@dataclasses.dataclass(frozen=True)
class ShardSet:
    """The shards of a ``::``-joined spec: URLs, sample counts and each shard's resampling weight."""

    urls: tuple[str, ...]
    counts: tuple[int, ...]
    weights: tuple[float, ...]

    @property
    def total(self) -> int:
        return sum(self.counts)

    @classmethod
    def from_spec(cls, spec: str, factors: Sequence[float] | None = None) -> ShardSet:
        sources = [part for part in spec.split("::") if part]
        if factors is not None and len(factors) != len(sources):
            raise ConfigError(
                f"--train-data-upsampling-factors has {len(factors)} value(s) for {len(sources)} source(s) in {spec!r}"
            )
        urls, weights = [], []
        for position, source in enumerate(sources):
            expanded = expand_source(source)
            urls += expanded
            weights += [float(factors[position]) if factors else 1.0] * len(expanded)
        counts = shard_counts(urls)
        if sum(counts) == 0:
            raise DataError(f"{spec}: the shards hold no samples")
        return cls(tuple(urls), tuple(counts), tuple(weights))


# ------------------------------------------------------------------------------------------------------ epoch order


def _rng(*parts: int) -> random.Random:
    return random.Random(":".join(map(str, parts)))


class EpochPlan:
    """Where emitted position ``q`` of an epoch lives: ``stream_pos(q)`` → ``locate`` → (shard, offset)."""

    def __init__(
        self, shards: ShardSet, epoch: int, seed: int, length: int, shuffle: bool, resampled: bool, window: int
    ) -> None:
        self.shards = shards
        self.epoch, self.seed, self.length = epoch, seed, length
        self.window = window if shuffle and window > 1 else 1
        n = len(shards.urls)
        order: list[int] = []
        total = 0
        if resampled:
            rng = _rng(seed, epoch, 1)
            while total < length:
                shard = rng.choices(range(n), weights=shards.weights)[0]
                order.append(shard)
                total += shards.counts[shard]
        else:
            cycle = 0
            while total < length:
                block = list(range(n))
                if shuffle:
                    _rng(seed, epoch, 2, cycle).shuffle(block)
                order += block
                total += shards.total
                cycle += 1
        self.order = order
        self.starts = [0]
        for shard in order:
            self.starts.append(self.starts[-1] + shards.counts[shard])

    def window_perm(self, w: int) -> list[int]:
        size = min(self.window, self.length - w * self.window)
        perm = list(range(size))
        _rng(self.seed, self.epoch, 3, w).shuffle(perm)
        return perm

    def locate(self, pos: int) -> tuple[int, int]:
        """Stream position → (index into ``order``, sample offset in that shard)."""
        i = bisect.bisect_right(self.starts, pos) - 1
        return i, pos - self.starts[i]


# ------------------------------------------------------------------------------------------------------ reading


class _StreamReader:
    """Reads stream positions of a plan, keeping a shard open while positions are consecutive; reopens a broken
    stream at the same sample (``retries`` times) and never drops a shard unnoticed."""

    def __init__(self, plan: EpochPlan, on_bad_sample: str, stats: dict) -> None:
        self.plan = plan
        self.on_bad = on_bad_sample
        self.stats = stats
        self._it: Iterator[dict] | None = None
        self._pos = -1  # next stream position the open iterator yields
        self._slot = (0, 0)  # (index into order, offset) of _pos
        self._last: dict | None = None
        self._broken: int | None = None  # index into order whose remainder is replaced (skip policy)

    def _url(self, slot: int) -> str:
        return self.plan.shards.urls[self.plan.order[slot]]

    def _open(self, slot: int, offset: int) -> Iterator[dict]:
        it = iter_samples(self._url(slot))
        for _ in range(offset):
            next(it)
        return it

    def get(self, pos: int) -> dict:
        if self._it is None or pos != self._pos:
            self.close()
            self._slot = self.plan.locate(pos)
        slot, offset = self._slot
        sample = self._read(slot, offset)
        self._pos = pos + 1
        count = self.plan.shards.counts[self.plan.order[slot]]
        self._slot = (slot + 1, 0) if offset + 1 >= count else (slot, offset + 1)
        if offset + 1 >= count:
            self.close()
        return sample

    def close(self) -> None:
        if self._it is not None:
            self._it.close()  # type: ignore[attr-defined]
            self._it = None

    def _read(self, slot: int, offset: int) -> dict:
        url = self._url(slot)
        if self._broken == slot and self._last is not None:
            self.stats["skipped"] += 1
            return self._last
        error: BaseException | None = None
        for attempt in range(RETRIES + 1):
            try:
                if self._it is None:
                    self._it = self._open(slot, offset)
                sample = next(self._it)
                self._last = sample
                return sample
            except StopIteration:
                error = EOFError(f"the stream ended after {offset} sample(s)")
            except _STREAM_ERRORS as exc:
                error = exc
            self.close()
            if attempt < RETRIES:
                self.stats["retries"] += 1
                _logger.warning(
                    "%s: stream broke at sample %d (%s: %s); retry %d/%d (%d retries so far)",
                    url, offset, type(error).__name__, error, attempt + 1, RETRIES, self.stats["retries"],
                )  # fmt: skip
        count = self.plan.shards.counts[self.plan.order[slot]]
        reason = f"{type(error).__name__}: {error}"
        message = f"{url}: unreadable from sample {offset} of {count} after {RETRIES} retries ({reason})"
        if self.on_bad == "skip" and self._last is not None:
            self._broken = slot
            self.stats["skipped"] += 1
            _logger.error(
                "%s; its remaining %d sample(s) are replaced by repeats (--on-bad-sample skip)", message, count - offset
            )
            return self._last
        raise DataError(message)


def decode_sample(sample: dict) -> tuple[Any, str, Any, Any]:
    """A shard sample → (PIL image, caption, image_id, text_id); DataError naming the shard and key."""
    import io

    from PIL import Image

    key, url = sample.get("__key__"), sample.get("__url__")
    where = f"{url}: sample {key}"
    ext = next((ext for ext in IMAGE_EXTS if ext in sample), None)
    if ext is None:
        members = ", ".join(k for k in sample if k[0] != "_")
        raise DataError(f"{where}: no .{'/.'.join(IMAGE_EXTS)} member (has {members})")
    image_id: Any = key
    text_id: Any = key
    try:
        if "json" in sample:
            meta = json.loads(sample["json"])
            text = meta.get("text") if isinstance(meta, dict) else None
            if not isinstance(text, str):
                raise DataError(f"{where}: .json has no string 'text'")
            image_id, text_id = meta.get("image_id", key), meta.get("text_id", key)
        elif "txt" in sample:
            text = sample["txt"].decode("utf-8").strip()
        else:
            raise DataError(f"{where}: no .json or .txt caption member")
    except (ValueError, UnicodeDecodeError) as exc:
        raise DataError(f"{where}: unreadable caption ({type(exc).__name__}: {exc})") from None
    try:
        image = Image.open(io.BytesIO(sample[ext]))
    except Exception as exc:  # Pillow raises many unrelated types for a corrupt file
        raise DataError(f"{where}: image_id {image_id}: cannot open .{ext} ({type(exc).__name__}: {exc})") from None
    return image, text, image_id, text_id


def with_item_seed(item_seed: int | None, fn: Callable[[], Any]) -> Any:
    """``fn()`` with Python's and torch's RNG seeded by ``item_seed`` (None: unseeded), restoring both after."""
    if item_seed is None:
        return fn()
    state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(item_seed)
        random.seed(item_seed)
        try:
            return fn()
        finally:
            random.setstate(state)


@dataclasses.dataclass(frozen=True)
class WdsCfg:
    """One split of shards: the epoch's layout and how its samples become items."""

    spec: str
    split: str
    batch_size: int  # per rank
    world_size: int
    rank: int
    num_samples: int | None = None  # per epoch; None: every sample once
    resampled: bool = False
    factors: tuple[float, ...] | None = None
    shuffle: bool = True
    shuffle_window: int = 1000
    seed: int = 123
    context_length: int = 52
    tokenizer: Any = None  # the architecture's; None = Chinese WordPiece
    on_bad_sample: str = "fail"
    random_transform: bool = False


class WebDatasetPairs(IterableDataset):
    """Yields whole collated batches ``(images, texts, eos, image_keys, text_keys)`` of this rank (see module doc).

    ``set_epoch``/``set_start`` play the role of the LMDB path's sampler; the DataLoader must use
    ``batch_size=None`` and non-persistent workers so every epoch's iteration carries them.
    """

    def __init__(self, cfg: WdsCfg, transform: Callable) -> None:
        check_on_bad_sample(cfg.on_bad_sample)
        if cfg.factors is not None and not cfg.resampled:
            raise ConfigError("--train-data-upsampling-factors needs --dataset-resampled")
        if cfg.num_samples is not None and cfg.num_samples < 1:
            raise ConfigError(f"--train-num-samples/--val-num-samples must be ≥ 1, got {cfg.num_samples}")
        self.cfg = cfg
        self.transform = transform
        self.shards = ShardSet.from_spec(cfg.spec, cfg.factors)
        self.real_len = cfg.num_samples or self.shards.total
        if cfg.resampled and cfg.num_samples is None:
            _logger.info("%s: resampled epochs of %d samples (the shards' total)", cfg.split, self.real_len)
        global_batch = cfg.batch_size * cfg.world_size
        self.num_samples = -(-self.real_len // global_batch) * global_batch
        self.num_batches = self.num_samples // global_batch
        self.epoch = 0
        self.start_batch = 0
        self.stats = {"retries": 0, "skipped": 0}
        _logger.info(
            "%s WebDataset: %d shard(s), %d samples, %d per epoch%s",
            cfg.split, len(self.shards.urls), self.shards.total, self.real_len, " (resampled)" if cfg.resampled else "",
        )  # fmt: skip

    # the sampler interface of the training loop
    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def set_start(self, start: int) -> None:
        """Skip the first ``start`` samples of this rank's epoch (a multiple of the batch size)."""
        self.start_batch = start // self.cfg.batch_size

    def __len__(self) -> int:
        return self.num_batches - self.start_batch

    def plan(self, epoch: int) -> EpochPlan:
        cfg = self.cfg
        return EpochPlan(self.shards, epoch, cfg.seed, self.real_len, cfg.shuffle, cfg.resampled, cfg.shuffle_window)

    def batch_order(self, num_workers: int, start: int) -> list[list[int]]:
        """Per worker, the rank's batch numbers it makes: the rank's batches cut into contiguous runs, one per worker,
        so that the DataLoader's round robin hands out batch ``start + t`` as its ``t``-th."""
        nb, nw = self.num_batches, max(1, num_workers)
        sizes = [nb // nw + (1 if j < nb % nw else 0) for j in range(nw)]
        firsts = [sum(sizes[:j]) for j in range(nw)]

        def canonical(t: int) -> int:
            return firsts[t % nw] + t // nw

        return [[canonical(t) for t in range(start + i, nb, nw)] for i in range(nw)]

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        plan = self.plan(self.epoch)
        reader = _StreamReader(plan, self.cfg.on_bad_sample, self.stats)
        window: tuple[int, list[dict]] | None = None
        base_seed = (self.cfg.seed * 1_000_003 + self.epoch) * 1_000_000_007
        per_rank = self.num_batches * self.cfg.batch_size
        for batch in self.batch_order(workers, self.start_batch)[worker]:
            first = self.cfg.rank * per_rank + batch * self.cfg.batch_size
            items = []
            for q in range(first, first + self.cfg.batch_size):
                base = q % self.real_len
                if plan.window == 1:
                    sample = reader.get(base)
                else:
                    w, within = divmod(base, plan.window)
                    if window is None or window[0] != w:
                        perm = plan.window_perm(w)
                        raw = [reader.get(w * plan.window + j) for j in range(len(perm))]
                        window = (w, [raw[j] for j in perm])
                    sample = window[1][within]
                items.append(self._item(sample, (base_seed + q) % (2**63 - 1)))
            yield self._collate(items)

    def _item(self, sample: dict, item_seed: int) -> tuple[Any, ...] | None:
        from cn_clip.data.loader import key_hash

        try:
            image, text, image_id, text_id = decode_sample(sample)
            seed = item_seed if self.cfg.random_transform else None
            context = self.cfg.context_length
            encoded = with_item_seed(
                seed, lambda: encode_pair(image, text, self.transform, context, image_id, self.cfg.tokenizer)
            )
        except DataError as exc:
            if self.cfg.on_bad_sample == "fail":
                raise DataError(f"{self.cfg.split}: {exc}") from None
            self.stats["skipped"] += 1
            _logger.warning("skipping bad sample (%d so far in this worker): %s", self.stats["skipped"], exc)
            return None
        return (*encoded, key_hash(("img", image_id)), key_hash(("txt", text_id)))

    def _collate(self, items: list[tuple[Any, ...] | None]) -> tuple[Any, ...]:
        from torch.utils.data import default_collate

        good = [item for item in items if item is not None]
        if not good:
            raise DataError(f"{self.cfg.split}: every sample of a batch is bad ({len(items)} in a row); giving up")
        return default_collate([item if item is not None else good[0] for item in items])
