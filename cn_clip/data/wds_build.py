"""Raw TSV/JSONL splits, or an LMDB built from them, → WebDataset shards plus ``index.json``.

    {out}/{split}-000000.tar   {key}.{jpg|png|webp|...} (the decoded base64 bytes, never re-encoded)
                               {key}.json {"text", "text_id", "image_id"}; key = the pair number, 9 digits
    {out}/{split}.txt          the split's shard names, one a line (a shard list the reader takes)
    {out}/index.json           {"version", "shards": [{"name", "split", "count", "bytes"}], "splits": {...}}

Samples follow the LMDB's pair order (texts in file order, each text's image ids in order), so a split read from its
shards without shuffling gives the same pairs in the same order as its LMDB. Raw input is validated by the LMDB
builder's pass 1 (one report of every problem with file:line and id; ``skip_bad`` drops the bad rows instead).
Each shard is written to a hidden temporary name and renamed when complete; ``index.json`` is written last.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import mmap
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from cn_clip.data import formats, lmdb_build
from cn_clip.errors import DataError

_logger = logging.getLogger(__name__)
_EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tiff"}
INDEX_VERSION = 1


@dataclasses.dataclass
class ShardStats:
    name: str
    split: str
    count: int = 0
    bytes: int = 0


@dataclasses.dataclass
class SplitShards:
    split: str
    shards: list[ShardStats]
    dropped: list[lmdb_build.Problem]

    @property
    def count(self) -> int:
        return sum(shard.count for shard in self.shards)


Pair = tuple[int, formats.Id, formats.Id, str, bytes]  # (pair number, image_id, text_id, text, image file bytes)


# ---------------------------------------------------------------------------------------------------- pair sources


def _raw_pairs(plan: lmdb_build.SplitPlan, skip_bad: bool) -> Iterator[Pair]:
    """The pairs of a validated raw split, in the LMDB builder's order, bad rows left out."""
    bad_lines = plan.images.bad_lines if skip_bad else set()
    values: dict[bytes, tuple[int, int] | bytes] = {}  # image id → its base64's span in the TSV, or the value
    with open(plan.imgs_path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        data = mmap.mmap(handle.fileno(), size, access=mmap.ACCESS_READ) if size else b""
        try:
            for line_no, raw_id, holder, start, end in lmdb_build._iter_tsv_lines(data):
                if raw_id is not None and line_no not in bad_lines and raw_id not in values:
                    values[raw_id] = (start, end) if holder is data else bytes(holder[start:end])
            number = 0
            skip_lines = plan.texts.bad_lines if skip_bad else set()
            dropped = plan.texts.dropped_pairs if skip_bad else {}
            for line_no, line in formats.iter_text_lines(plan.texts_path):
                if line_no in skip_lines:
                    continue
                record = formats.parse_text_line(line)
                for position, image_id in enumerate(record.image_ids):
                    if position in dropped.get(line_no, ()):
                        continue
                    value = values[str(image_id).encode("utf-8")]
                    b64 = data[value[0] : value[1]] if isinstance(value, tuple) else value
                    yield number, image_id, record.text_id, record.text, formats.b64decode_image(b64)
                    number += 1
        finally:
            if size:
                data.close()


def _lmdb_pairs(split_dir: Path, check: str, problems: list[lmdb_build.Problem]) -> Iterator[Pair]:
    """The pairs of an LMDB split in pair order; an image that does not open is a problem, not a sample."""
    from cn_clip.data.lmdb_dataset import LMDBDataset

    dataset = LMDBDataset(split_dir, split_dir.name)
    name = f"{split_dir.name}/imgs"
    try:
        for number in range(dataset.number_samples):
            image_id, text_id, text = dataset.read_pair(number)
            b64 = dataset._envs.txn("imgs").get(str(image_id).encode("utf-8"))
            if b64 is None:
                problems.append(lmdb_build.Problem(name, 0, f"image_id {image_id}", f"missing (pair {number})"))
                continue
            raw = formats.b64decode_image(bytes(b64))
            problem = formats.image_problem(raw, full=check == "full") if check != "off" else None
            if problem:
                problems.append(lmdb_build.Problem(name, 0, f"image_id {image_id}", f"{problem} (pair {number})"))
                continue
            yield number, image_id, text_id, text, raw
    finally:
        dataset.close()


# ---------------------------------------------------------------------------------------------------- writing


class ShardWriter:
    """Samples → ``{split}-NNNNNN.tar`` shards of at most ``max_count`` samples / ``max_bytes`` bytes, each written
    under a hidden temporary name and renamed into place when closed."""

    def __init__(self, out: Path, split: str, max_count: int, max_bytes: int | None) -> None:
        self.out, self.split = out, split
        self.max_count, self.max_bytes = max_count, max_bytes
        self.shards: list[ShardStats] = []
        self._tar: Any = None
        self._file: Any = None
        self._tmp: Path | None = None

    def _open(self) -> None:
        from cn_clip.extras import require

        wds = require("webdataset", "build_webdataset")
        name = f"{self.split}-{len(self.shards):06d}.tar"
        self._tmp = self.out / f".{name}.tmp"
        self._file = open(self._tmp, "wb")  # noqa: SIM115 (closed by close() or abort())
        self._tar = wds.TarWriter(self._file, encoder=False, mtime=0)
        self.shards.append(ShardStats(name, self.split))

    def write(self, key: str, ext: str, image: bytes, meta: dict) -> None:
        current = self.shards[-1] if self.shards else None
        payload = json.dumps(meta, ensure_ascii=False).encode("utf-8")
        size = _tar_bytes(image) + _tar_bytes(payload)
        full = current is not None and (
            current.count >= self.max_count
            or (self.max_bytes and current.count and current.bytes + size > self.max_bytes)
        )
        if self._tar is None or full:
            self.close()
            self._open()
        self._tar.write({"__key__": key, ext: image, "json": payload})
        shard = self.shards[-1]
        shard.count += 1
        shard.bytes += size  # tarfile buffers: the file's size lags

    def close(self) -> None:
        if self._tar is None:
            return
        self._tar.close()  # the end-of-archive blocks
        self._file.close()
        shard = self.shards[-1]
        shard.bytes = self._tmp.stat().st_size
        os.replace(self._tmp, self.out / shard.name)
        self._tar = self._file = self._tmp = None

    def abort(self) -> None:
        if self._tar is not None:
            self._tar.close()  # what tarfile still buffers goes to the temporary file, removed below
        if self._file is not None:
            self._file.close()
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)
        self._tar = self._file = self._tmp = None


def _tar_bytes(data: bytes) -> int:
    """A member's share of a tar file: a 512-byte header plus its data padded to 512 bytes."""
    return 512 + -(-len(data) // 512) * 512


def _extension(raw: bytes) -> str:
    fmt = formats.sniff_format(raw)
    if fmt is None:
        from PIL import Image

        with Image.open(io.BytesIO(raw)) as img:
            fmt = img.format
    return _EXTENSIONS.get(fmt or "", "jpg")


def write_shards(
    pairs: Iterator[Pair], out: Path, split: str, max_count: int, max_bytes: int | None
) -> list[ShardStats]:
    writer = ShardWriter(out, split, max_count, max_bytes)
    try:
        for number, image_id, text_id, text, raw in pairs:
            writer.write(
                f"{number:09d}", _extension(raw), raw, {"text": text, "text_id": text_id, "image_id": image_id}
            )
        writer.close()
    except BaseException:
        writer.abort()
        raise
    return writer.shards


def _brace(names: Sequence[str], split: str) -> str:
    return f"{split}-{{000000..{len(names) - 1:06d}}}.tar" if len(names) > 1 else names[0]


def write_index(out: Path, results: Sequence[SplitShards]) -> dict:
    """Merge the built splits into ``out/index.json`` (other splits' entries kept) and write each ``{split}.txt``."""
    from cn_clip.fileio import atomic_write

    path = out / "index.json"
    index: dict[str, Any] = {"version": INDEX_VERSION, "shards": [], "splits": {}}
    if path.is_file():
        old = json.loads(path.read_text(encoding="utf-8"))
        built = {result.split for result in results}
        index["shards"] = [shard for shard in old.get("shards", []) if shard.get("split") not in built]
        index["splits"] = {name: v for name, v in old.get("splits", {}).items() if name not in built}
    for result in results:
        names = [shard.name for shard in result.shards]
        with atomic_write(out / f"{result.split}.txt") as handle:
            handle.write("".join(name + "\n" for name in names))
        index["shards"] += [dataclasses.asdict(shard) for shard in result.shards]
        index["splits"][result.split] = {
            "count": result.count,
            "shards": len(names),
            "list": f"{result.split}.txt",
            "pattern": _brace(names, result.split) if names else None,
            "dropped": len(result.dropped),
        }
    with atomic_write(path) as handle:
        json.dump(index, handle, ensure_ascii=False, indent=1)
        handle.write("\n")
    return index


def _build_split(
    out: Path,
    split: str,
    pairs: Iterator[Pair],
    problems: list[lmdb_build.Problem],
    shard_size: int,
    shard_bytes: int | None,
    skip_bad: bool,
    report: Path | None,
) -> SplitShards:
    """Shards of one split, written into ``.{split}.staging`` and moved into place only once all are complete."""
    import shutil

    staged = out / f".{split}.staging"
    if staged.exists():
        _logger.warning("removing %s, left by an interrupted build", staged)
        shutil.rmtree(staged)
    staged.mkdir()
    try:
        shards = write_shards(pairs, staged, split, shard_size, shard_bytes)
        if problems and not skip_bad:  # LMDB input: found while writing
            _fail_lmdb(problems, report)
        for old in out.glob(f"{split}-*.tar"):
            old.unlink()
        for shard in shards:
            os.replace(staged / shard.name, out / shard.name)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    return SplitShards(split, shards, problems)


def build_webdataset(
    data_dir: str | Path,
    splits: Sequence[str],
    out: str | Path | None = None,
    *,
    shard_size: int = 1000,
    shard_bytes: int | None = None,
    skip_bad: bool = False,
    check_images: str = "header",
    lmdb_dir: str | Path | None = None,
    source: str = "auto",
    workers: int | None = None,
    report: str | Path | None = None,
) -> list[SplitShards]:
    """Build every split into shards under ``out`` (default ``{data_dir}/wds``); raise DataError listing all problems.

    ``source``: ``raw`` ({split}_imgs.tsv + {split}_texts.jsonl), ``lmdb`` (``{lmdb_dir}/{split}``, default
    ``{data_dir}/lmdb``) or ``auto`` (raw when both raw files of the first split exist).
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"The data_dir does not exist! Please check the input args... ({data_dir})")
    if shard_size < 1:
        raise DataError(f"--shard-size must be ≥ 1, got {shard_size}")
    out = Path(out) if out else data_dir / "wds"
    lmdb_root = Path(lmdb_dir) if lmdb_dir else data_dir / "lmdb"
    if source == "auto":
        imgs, texts = lmdb_build._split_files(data_dir, splits[0])
        source = "raw" if imgs.is_file() and texts.is_file() else "lmdb"
    report_path = Path(report) if report else None
    if source == "raw":
        plans = lmdb_build.validate_splits(data_dir, splits, check_images=check_images, workers=workers)
        if not skip_bad:
            lmdb_build._fail_on_problems(plans, report_path)
        jobs = [(plan.split, _raw_pairs(plan, skip_bad), plan.problems) for plan in plans]
    elif source == "lmdb":
        missing = [split for split in splits if not (lmdb_root / split / "pairs").is_dir()]
        if missing:
            raise DataError(f"no raw files and no LMDB split {lmdb_root / missing[0]} to build shards from")
        jobs = []
        for split in splits:
            problems: list[lmdb_build.Problem] = []
            jobs.append((split, _lmdb_pairs(lmdb_root / split, check_images, problems), problems))
    else:
        raise DataError(f"--source must be raw, lmdb or auto, got {source!r}")
    out.mkdir(parents=True, exist_ok=True)
    results = [_build_split(out, *job, shard_size, shard_bytes, skip_bad, report_path) for job in jobs]
    write_index(out, results)
    dropped = [problem for result in results for problem in result.dropped]
    if dropped:
        _logger.warning("--skip-bad dropped %d row(s):\n%s", len(dropped), lmdb_build.format_problems(dropped))
        if report_path:
            lmdb_build._write_report(report_path, {"status": "built", "dropped": [p.to_json() for p in dropped]})
    return results


def _fail_lmdb(problems: list[lmdb_build.Problem], report: Path | None) -> None:
    if report is not None:
        lmdb_build._write_report(report, {"status": "failed", "problems": [p.to_json() for p in problems]})
    raise DataError(
        f"{len(problems)} problem(s); nothing was written (fix them, or pass --skip-bad to drop the bad rows):\n"
        f"{lmdb_build.format_problems(problems)}"
    )
