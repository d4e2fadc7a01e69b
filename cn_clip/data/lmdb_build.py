"""Raw TSV/JSONL splits → the reference's LMDB layout, validated first and written atomically.

Layout (compatibility.md#lmdb-layout, byte-identical keys and values to ``cn-clip`` 1.6.0)::

    {lmdb_dir}/{split}/pairs   "0".."N-1" → pickle((image_id, text_id, text), protocol 4); b"num_samples" → N
    {lmdb_dir}/{split}/imgs    TSV id verbatim → base64 text bytes;                        b"num_images" → count

Two passes per split. Pass 1 validates everything (TSV chunks in parallel worker processes, JSONL meanwhile in this
process) and collects every problem; nothing is written unless the input is clean or ``skip_bad`` drops the bad rows.
Pass 2 streams the files again into a temporary sibling directory that replaces the target only when complete.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import logging
import mmap
import os
import sys
import time
from collections.abc import Callable, Container, Iterable, Iterator, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from cn_clip.data import formats
from cn_clip.errors import ConfigError, DataError

_logger = logging.getLogger(__name__)

PAGE_SIZE = 4096
MAX_LISTED_PROBLEMS = 20
_TXN_BYTES = 64 << 20  # bytes buffered per write transaction: bounds memory and the replay after a map resize
_MIN_CHUNK = 1 << 20
_MAX_CHUNK = 4 << 20  # small enough that the writer, once done, can take the last chunks off the pool
_PARALLEL_MIN_BYTES = 8 << 20  # below this a worker pool costs more than it saves
_WINDOW = 32 << 20  # TSV bytes mapped at a time while writing
_REMAP_BYTES = 64 << 20  # writemap pages stay resident while mapped: reopen the environment after this much


@dataclass(frozen=True)
class Problem:
    """One bad row: ``train_texts.jsonl:12: text_id 5: image_id 7 not in train_imgs.tsv``."""

    file: str
    line: int
    subject: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.subject}: {self.message}" if self.subject else f"{where}: {self.message}"

    def to_json(self) -> dict:
        return {"file": self.file, "line": self.line, "id": self.subject, "problem": self.message}


# ----------------------------------------------------------------------------------------------------- pass 1: TSV


@dataclass
class _ChunkScan:
    """What one worker learned about a byte range of a TSV (line numbers are local to the chunk, 1-based)."""

    n_lines: int = 0
    ids: list[bytes] = field(default_factory=list)
    id_lines: list[int] = field(default_factory=list)
    problems: list[tuple[int, str, str]] = field(default_factory=list)
    bad_ids: list[tuple[bytes, int]] = field(default_factory=list)
    map_bytes: int = 0


def _value_map_bytes(key_len: int, value_len: int) -> int:
    """Rough LMDB footprint of one record: overflow pages for big values, a share of a leaf page otherwise."""
    if value_len > PAGE_SIZE // 2 - 64:
        return (value_len + 16 + PAGE_SIZE - 1) // PAGE_SIZE * PAGE_SIZE + 2 * (key_len + 24)
    return 2 * (key_len + value_len + 24)


_ASCII_SPACE = frozenset(b" \t\n\r\x0b\x0c")
_FAST_EDGE = frozenset(range(0x21, 0x7F))  # printable ASCII: the line's ends need no Unicode-aware stripping
_chunk_buffer = bytearray()  # reused per process, so reading a chunk does not page-fault fresh memory


def _read_chunk(path: str, start: int, end: int) -> bytearray:
    global _chunk_buffer
    size = end - start
    if len(_chunk_buffer) > size:
        del _chunk_buffer[size:]
    elif len(_chunk_buffer) < size:
        _chunk_buffer += bytes(size - len(_chunk_buffer))
    view = memoryview(_chunk_buffer)
    with open(path, "rb", buffering=0) as handle:
        handle.seek(start)
        filled = 0
        while filled < size:
            got = handle.readinto(view[filled:])
            if not got:
                raise DataError(f"{path}: file shrank while it was being read")
            filled += got
    return _chunk_buffer


def _iter_tsv_lines(
    buf: bytes | bytearray | mmap.mmap, begin: int = 0, counter: list[int] | None = None
) -> Iterator[tuple[int, bytes | None, bytes | bytearray, int, int]]:
    """Parse every non-blank line of ``buf``: (line_no, id or None, holder, start, end) with the value at
    ``holder[start:end]``; a malformed line yields id None and the message as ``holder``. Parsing starts at byte
    ``begin``; ``counter[0]`` ends as the number of lines seen (blank ones included).
    """
    find, total = buf.find, len(buf)
    pos, line_no = begin, 0
    while pos < total:
        if counter is not None:
            counter[0] = line_no + 1
        newline = find(b"\n", pos)
        newline = total if newline == -1 else newline
        line_no += 1
        start, end = pos, newline
        pos = newline + 1
        if end > start and buf[end - 1] == 13:  # \r of a CRLF file
            end -= 1
        if end <= start or buf[start] not in _FAST_EDGE or buf[end - 1] not in _FAST_EDGE:
            line = bytes(buf[start:end])
            if not line.strip():
                continue
            try:  # slow path: Unicode-aware stripping exactly like the reference
                raw_id, value = formats.split_tsv_line(line)
            except (ValueError, UnicodeDecodeError) as exc:
                yield line_no, None, str(exc).encode(), 0, 0
                continue
            yield line_no, raw_id, value, 0, len(value)
            continue
        tab = find(b"\t", start, end)
        if tab == -1 or find(b"\t", tab + 1, end) != -1 or find(b"\r", start, end) != -1:
            try:
                raw_id, value = formats.split_tsv_line(bytes(buf[start:end]))
            except (ValueError, UnicodeDecodeError) as exc:
                yield line_no, None, str(exc).encode(), 0, 0
                continue
            yield line_no, raw_id, value, 0, len(value)
            continue
        yield line_no, bytes(buf[start:tab]), buf, tab + 1, end


def _scan_tsv_chunk(path: str, start: int, end: int, check_images: str) -> _ChunkScan:
    """Validate the TSV lines in ``[start, end)``; runs in a worker process."""
    buf = _read_chunk(path, start, end)
    # One pass over the whole chunk finds any byte outside the base64 alphabet; only then are lines checked singly.
    alphabet_ok = not buf.translate(None, formats.B64_ALPHABET + b"\t\n\r")
    scan = _ChunkScan()
    counter = [0]
    for line_no, raw_id, holder, v_start, v_end in _iter_tsv_lines(buf, 0, counter):
        if raw_id is None:
            scan.problems.append((line_no, "", holder.decode()))
            continue
        try:
            id_text = formats.decode_id(raw_id)
        except ValueError as exc:
            scan.problems.append((line_no, "", str(exc)))
            continue
        if check_images == "off":
            problem = formats.base64_problem(holder, v_start, v_end, alphabet_ok)
        else:
            problem = formats.check_b64_image(holder, v_start, v_end, check_images == "full", alphabet_ok)
        if problem:
            scan.problems.append((line_no, f"image_id {id_text}", problem))
            scan.bad_ids.append((raw_id, line_no))
            continue
        scan.ids.append(raw_id)
        scan.id_lines.append(line_no)
        scan.map_bytes += _value_map_bytes(len(raw_id), v_end - v_start)
    scan.n_lines = counter[0]  # every line, blank ones included
    return scan


def _chunk_ranges(path: Path, chunk_bytes: int) -> list[tuple[int, int]]:
    """Split a file into byte ranges that start at line starts."""
    size = path.stat().st_size
    ranges: list[tuple[int, int]] = []
    with open(path, "rb") as handle:
        start = 0
        while start < size:
            handle.seek(min(start + chunk_bytes, size))
            if handle.tell() < size:
                handle.readline()
            end = min(handle.tell(), size)
            ranges.append((start, end))
            start = end
    return ranges


@dataclass
class TsvScan:
    """Result of validating one ``{split}_imgs.tsv``."""

    good: dict[bytes, int] = field(default_factory=dict)  # id → line of every image that will be written
    bad_ids: dict[bytes, int] = field(default_factory=dict)  # ids whose line was rejected → line
    bad_lines: set[int] = field(default_factory=set)
    problems: list[Problem] = field(default_factory=list)
    n_lines: int = 0
    map_bytes: int = 0


def _merge_chunks(name: str, scans: Iterable[_ChunkScan]) -> TsvScan:
    result = TsvScan()
    offset = 0
    for scan in scans:
        for line_no, subject, message in scan.problems:
            result.problems.append(Problem(name, offset + line_no, subject, message))
            result.bad_lines.add(offset + line_no)
        for raw_id, line_no in scan.bad_ids:
            result.bad_ids.setdefault(raw_id, offset + line_no)
        for raw_id, line_no in zip(scan.ids, scan.id_lines, strict=True):
            line = offset + line_no
            if raw_id == formats.NUM_IMAGES_KEY:
                result.problems.append(Problem(name, line, "image_id num_images", "reserved key, rename this image"))
            elif raw_id in result.good:
                first = result.good[raw_id]
                subject = f"image_id {raw_id.decode('utf-8')}"
                result.problems.append(Problem(name, line, subject, f"duplicate image id (first at line {first})"))
            else:
                result.good[raw_id] = line
                continue
            result.bad_lines.add(line)
        result.map_bytes += scan.map_bytes
        offset += scan.n_lines
    result.n_lines = offset
    result.problems.sort(key=lambda problem: problem.line)
    return result


@dataclass
class _ScanJob:
    """One chunk of a TSV being validated: a pool future, or the result when it ran here."""

    path: str
    start: int
    end: int
    check_images: str
    future: Future | None = None
    result: _ChunkScan | None = None

    def run_here_if_not_started(self) -> bool:
        """Validate in this process when the pool has not started the chunk yet (work stealing)."""
        if self.future is None or not self.future.cancel():
            return False
        self.result, self.future = _scan_tsv_chunk(self.path, self.start, self.end, self.check_images), None
        return True

    def get(self) -> _ChunkScan:
        return self.result if self.future is None else self.future.result()


def _submit_tsv_scan(path: Path, check_images: str, pool: Executor | None, workers: int) -> list[_ScanJob]:
    size = path.stat().st_size
    if pool is None or size < _PARALLEL_MIN_BYTES:
        return [_ScanJob(str(path), 0, size, check_images, result=_scan_tsv_chunk(str(path), 0, size, check_images))]
    chunk = max(_MIN_CHUNK, min(_MAX_CHUNK, size // (workers * 4) + 1))
    jobs = [_ScanJob(str(path), start, end, check_images) for start, end in _chunk_ranges(path, chunk)]
    for job in jobs:
        job.future = pool.submit(_scan_tsv_chunk, job.path, job.start, job.end, job.check_images)
    return jobs


def _collect(jobs: list[_ScanJob], desc: str) -> Iterator[_ChunkScan]:
    """Every chunk's result in file order. This process, its own writing done, first validates the chunks that the
    pool has not started, from the last one back, so neither side waits on the other."""
    from tqdm import tqdm

    with tqdm(total=len(jobs), desc=desc, unit="chunk", disable=None, leave=False) as bar:
        for job in reversed(jobs):
            if not job.run_here_if_not_started():
                break
            bar.update(1)
        for job in jobs:
            result = job.get()
            if job.future is not None:
                bar.update(1)
            yield result


# --------------------------------------------------------------------------------------------------- pass 1: texts


@dataclass
class TextScan:
    """Result of validating one ``{split}_texts.jsonl`` against its images."""

    bad_lines: set[int] = field(default_factory=set)
    dropped_pairs: dict[int, set[int]] = field(default_factory=dict)  # line → positions in image_ids
    problems: list[Problem] = field(default_factory=list)
    n_texts: int = 0
    n_pairs: int = 0
    map_bytes: int = 0
    refs: list[tuple[int, str, tuple]] = field(default_factory=list)  # (line, text subject, image ids)


def _scan_texts(path: Path, on_record: Callable[[formats.TextRecord], None] | None = None) -> TextScan:
    """Validate a texts JSONL; ``on_record`` gets each good record in file order until the first problem (the
    speculative build writes the pairs from this one parse)."""
    name = path.name
    scan = TextScan()
    seen_text_ids: dict[object, int] = {}
    try:
        for line_no, line in formats.iter_text_lines(path):
            try:
                record = formats.parse_text_line(line)
            except ValueError as exc:
                scan.problems.append(Problem(name, line_no, "", str(exc)))
                scan.bad_lines.add(line_no)
                continue
            subject = f"text_id {record.text_id}"
            id_key = (type(record.text_id), record.text_id)
            if id_key in seen_text_ids:
                first = seen_text_ids[id_key]
                scan.problems.append(Problem(name, line_no, subject, f"duplicate text id (first at line {first})"))
                scan.bad_lines.add(line_no)
                continue
            seen_text_ids[id_key] = line_no
            if on_record is not None and not scan.problems:
                on_record(record)
            scan.n_texts += 1
            scan.refs.append((line_no, subject, record.image_ids))
            scan.map_bytes += len(record.image_ids) * 2 * (len(record.text.encode("utf-8")) + 64)
    except UnicodeDecodeError as exc:
        scan.problems.append(Problem(name, 0, "", f"not valid UTF-8 ({exc.reason} at byte {exc.start})"))
    return scan


def _cross_check(texts: TextScan, images: TsvScan, texts_name: str, imgs_name: str) -> None:
    """Every image id a text names must be a good image of the split (matched as ``str(id)``, like the reader)."""
    for line_no, subject, image_ids in texts.refs:
        for position, image_id in enumerate(image_ids):
            key = str(image_id).encode("utf-8")
            if key in images.good:
                texts.n_pairs += 1
                continue
            if key in images.bad_ids:
                message = f"image_id {image_id} has a bad image ({imgs_name}:{images.bad_ids[key]})"
            else:
                message = f"image_id {image_id} not in {imgs_name}"
            texts.problems.append(Problem(texts_name, line_no, subject, message))
            texts.dropped_pairs.setdefault(line_no, set()).add(position)
    texts.refs.clear()


@dataclass
class SplitPlan:
    split: str
    imgs_path: Path
    texts_path: Path
    images: TsvScan
    texts: TextScan

    @property
    def problems(self) -> list[Problem]:
        return self.images.problems + self.texts.problems


def _split_files(data_dir: Path, split: str) -> tuple[Path, Path]:
    return data_dir / f"{split}_imgs.tsv", data_dir / f"{split}_texts.jsonl"


def _missing_files(data_dir: Path, split: str) -> list[Problem]:
    return [
        Problem(p.name, 0, "", f"file not found in {data_dir}")
        for p in _split_files(data_dir, split)
        if not p.is_file()
    ]


def _plan_split(
    data_dir: Path,
    split: str,
    check_images: str,
    pool: Executor | None,
    workers: int,
    on_record: Callable[[formats.TextRecord], None] | None = None,
    while_scanning: Callable[[TextScan], None] | None = None,
) -> SplitPlan:
    """Pass 1 for one split. ``on_record`` sees each good text as it is parsed and ``while_scanning(texts)`` runs
    after the texts, both in this process while the TSV workers are busy."""
    imgs_path, texts_path = _split_files(data_dir, split)
    jobs = _submit_tsv_scan(imgs_path, check_images, pool, workers)
    texts = _scan_texts(texts_path, on_record)
    if while_scanning is not None:
        while_scanning(texts)
    images = _merge_chunks(imgs_path.name, _collect(jobs, f"check {split} images"))
    _cross_check(texts, images, texts_path.name, imgs_path.name)
    plan = SplitPlan(split, imgs_path, texts_path, images, texts)
    _logger.info(
        "validated %s: %d images, %d texts, %d pairs, %d problem(s)",
        split,
        len(images.good),
        texts.n_texts,
        texts.n_pairs,
        len(plan.problems),
    )
    return plan


def validate_splits(
    data_dir: str | Path, splits: Sequence[str], check_images: str = "header", workers: int | None = None
) -> list[SplitPlan]:
    """Pass 1 for every split; bad rows do not raise, they are in each plan's ``problems``."""
    data_dir = Path(data_dir)
    workers = _resolve_workers(workers)
    _raise_missing_files(data_dir, splits)
    with _pool(workers) as pool:
        return [_plan_split(data_dir, split, check_images, pool, workers) for split in splits]


def _raise_missing_files(data_dir: Path, splits: Sequence[str]) -> None:
    missing = [problem for split in splits for problem in _missing_files(data_dir, split)]
    if missing:
        raise DataError(f"{len(missing)} input file(s) missing; nothing was written:\n{format_problems(missing)}")


def _resolve_workers(workers: int | None) -> int:
    """``--workers`` of both builders (LMDB and WebDataset): None is the default, fewer than 1 an error."""
    if workers is None:
        return _default_workers()
    if workers < 1:
        raise ConfigError("--workers must be at least 1")
    return workers


def _default_workers() -> int:
    """One image-checking worker per core but one, left for the process that writes the LMDB meanwhile (and then
    validates the chunks no worker has started). benchmarks/build_lmdb.py, rotated runs on 2 cores: one worker per
    core is 15-25 % slower, the three processes contending for two cores."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores - 1)


@contextlib.contextmanager
def _pool(workers: int) -> Iterator[Executor]:
    import multiprocessing

    # fork starts in milliseconds; the builder holds no LMDB handle while the pool starts.
    method = "fork" if sys.platform.startswith("linux") else None
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context(method))
    try:
        yield pool
    finally:
        pool.shutdown(cancel_futures=True)


# --------------------------------------------------------------------------------------------------- pass 2: write


class LmdbWriter:
    """Buffered LMDB writes whose map grows on demand (no fixed 1 TiB reservation)."""

    def __init__(self, path: Path, map_size: int, txn_bytes: int = _TXN_BYTES) -> None:
        import lmdb

        self._lmdb = lmdb
        self.path = Path(path)
        self.map_size = max(int(map_size), 1 << 16)
        self.env = self._open()
        self.since_open = 0
        self.txn_bytes = txn_bytes
        self.pending: list[tuple[bytes, bytes | memoryview]] = []
        self.pending_bytes = 0
        self.resizes = 0

    def _open(self):
        # writemap writes straight into the file mapping (~4x faster puts); Linux only, because elsewhere it
        # preallocates the whole map on disk. No sync per commit: close() syncs once before the rename.
        return self._lmdb.open(
            str(self.path),
            map_size=self.map_size,
            subdir=True,
            sync=False,
            metasync=False,
            meminit=False,
            writemap=sys.platform.startswith("linux"),
        )

    def put(self, key: bytes, value: bytes | memoryview) -> None:
        self.pending.append((key, value))
        self.pending_bytes += len(key) + len(value)
        if self.pending_bytes >= self.txn_bytes:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        while True:
            try:
                with self.env.begin(write=True) as txn:
                    txn.cursor().putmulti(self.pending)
                break
            except self._lmdb.MapFullError:
                self._grow()
        self.since_open += self.pending_bytes
        self.pending.clear()
        self.pending_bytes = 0
        if self.since_open >= _REMAP_BYTES:  # written pages are in the page cache; unmapping drops them from RSS
            self.env.close()
            self.env = self._open()
            self.since_open = 0

    def _grow(self) -> None:
        self.map_size = max(self.map_size * 2, self.map_size + 4 * self.pending_bytes)
        _logger.debug("LMDB map of %s full, growing to %d bytes", self.path, self.map_size)
        self.env.set_mapsize(self.map_size)
        self.resizes += 1

    def close(self) -> None:
        self.flush()
        self.env.sync(True)
        used = (self.env.info()["last_pgno"] + 1) * self.env.stat()["psize"]
        self.env.close()
        data_file = self.path / "data.mdb"
        if data_file.stat().st_size > used:  # writemap sized the file to the map; give the unused tail back
            os.truncate(data_file, used)


def _estimate(path: Path, factor: float) -> int:
    return int(path.stat().st_size * factor) + (16 << 20)


def _write_images(imgs_path: Path, split: str, out_dir: Path, map_size: int, bad_lines: set[int]) -> int:
    from tqdm import tqdm

    writer = LmdbWriter(out_dir, map_size)
    count = lines_before = 0
    total = imgs_path.stat().st_size
    with (
        open(imgs_path, "rb") as handle,
        tqdm(total=total, desc=f"{split} images", unit="B", unit_scale=True, disable=None, leave=False) as bar,
    ):
        for start, end in _chunk_ranges(imgs_path, _WINDOW):
            # Values go from the page cache into LMDB as views of a read-only window: no copy in Python, and
            # unmapping each window keeps the resident set flat however large the TSV is.
            base = start - start % mmap.ALLOCATIONGRANULARITY
            with mmap.mmap(handle.fileno(), end - base, access=mmap.ACCESS_READ, offset=base) as data:
                view, counter = memoryview(data), [0]
                for line_no, raw_id, holder, v_start, v_end in _iter_tsv_lines(data, start - base, counter):
                    if raw_id is None or lines_before + line_no in bad_lines:
                        continue
                    writer.put(raw_id, view[v_start:v_end] if holder is data else holder[v_start:v_end])
                    count += 1
                writer.flush()  # before the window is unmapped
                view.release()
            lines_before += counter[0]
            bar.update(end - start)
    writer.put(formats.NUM_IMAGES_KEY, str(count).encode("utf-8"))
    writer.close()
    return count


class PairWriter:
    """The ``pairs`` LMDB: key ``str(n)`` → the pickled ``(image_id, text_id, text)`` of the n-th pair, then
    ``num_samples``, as the reference writes it."""

    def __init__(self, out_dir: Path, map_size: int) -> None:
        self.writer = LmdbWriter(out_dir, map_size)
        self.count = 0

    def add(self, record: formats.TextRecord, drop: Container[int] = ()) -> None:
        """One text's pairs, one per image id, leaving out the positions in ``drop``."""
        for position, image_id in enumerate(record.image_ids):
            if position not in drop:
                self.writer.put(
                    str(self.count).encode("utf-8"), formats.dumps_pair(image_id, record.text_id, record.text)
                )
                self.count += 1

    def close(self) -> int:
        self.writer.put(formats.NUM_SAMPLES_KEY, str(self.count).encode("utf-8"))
        self.writer.close()
        return self.count

    def abandon(self) -> None:
        """Close without finishing (the build failed; its temp dir goes)."""
        self.writer.env.close()


def _write_pairs(texts_path: Path, split: str, out_dir: Path, map_size: int, skip: TextScan) -> int:
    """``--skip-bad``'s pass 2: re-read the texts, leaving out the bad lines and the dropped pairs."""
    from tqdm import tqdm

    pairs = PairWriter(out_dir, map_size)
    with tqdm(desc=f"{split} pairs", unit="pair", disable=None, leave=False) as bar:
        for line_no, line in formats.iter_text_lines(texts_path):
            if line_no in skip.bad_lines:
                continue
            before = pairs.count
            pairs.add(formats.parse_text_line(line), skip.dropped_pairs.get(line_no, ()))
            bar.update(pairs.count - before)
    return pairs.close()


# ---------------------------------------------------------------------------------------------------- orchestration


@dataclass
class SplitResult:
    split: str
    path: Path
    n_images: int = 0
    n_pairs: int = 0
    n_texts: int = 0
    dropped: list[Problem] = field(default_factory=list)


def parse_splits(value: str) -> list[str]:
    """``"train, valid,train"`` → ``["train", "valid"]``: order kept (the reference's set order is undefined)."""
    splits = list(dict.fromkeys(part.strip() for part in value.split(",") if part.strip()))
    if not splits:
        raise DataError(f"--splits {value!r} names no split")
    bad = [split for split in splits if split in (".", "..") or "/" in split or os.sep in split]
    if bad:
        raise DataError(f"--splits: {bad[0]!r} is not a valid split name")
    return splits


def format_problems(problems: Sequence[Problem], limit: int = MAX_LISTED_PROBLEMS) -> str:
    lines = [f"  {problem}" for problem in problems[:limit]]
    if len(problems) > limit:
        lines.append(f"  ... and {len(problems) - limit} more")
    return "\n".join(lines)


def _write_report(path: Path, payload: dict) -> None:
    from cn_clip.fileio import atomic_write

    with atomic_write(path) as handle:
        json.dump(payload, handle, ensure_ascii=False, indent=1)
        handle.write("\n")


def _fail_on_problems(plans: list[SplitPlan], report: Path | None) -> None:
    problems = [problem for plan in plans for problem in plan.problems]
    if not problems:
        return
    if report is not None:
        _write_report(report, {"status": "failed", "problems": [p.to_json() for p in problems]})
    files = len({problem.file for problem in problems})
    hint = f"full list in {report}" if report else "fix them, or pass --skip-bad to drop the bad rows"
    raise DataError(
        f"{len(problems)} problem(s) in {files} file(s); nothing was written ({hint}):\n{format_problems(problems)}"
    )


def _check_targets(lmdb_dir: Path, splits: Sequence[str], overwrite: bool) -> None:
    existing = [lmdb_dir / split for split in splits if (lmdb_dir / split).exists()]
    if existing and not overwrite:
        names = ", ".join(str(path) for path in existing)
        raise DataError(
            f"LMDB target already exists: {names} (pass --overwrite to replace it after a successful build)"
        )
    for split in splits:
        stale = sorted(lmdb_dir.glob(f".{split}.*.tmp"))
        if stale:
            _logger.warning("leftover temporary dir(s) of an interrupted build: %s", ", ".join(map(str, stale)))


def _build_validated(plans: list[SplitPlan], lmdb_dir: Path, map_size: int | None, stack) -> list[SplitResult]:
    """``--skip-bad``: pass 2 over validated plans, leaving out every bad row."""
    from cn_clip.fileio import atomic_dir

    results = []
    for plan in plans:
        tmp = stack.enter_context(atomic_dir(lmdb_dir / plan.split, overwrite=True))
        result = SplitResult(plan.split, lmdb_dir / plan.split, n_texts=plan.texts.n_texts, dropped=plan.problems)
        pairs_map = map_size or _estimate(plan.texts_path, 3.0)
        result.n_pairs = _write_pairs(plan.texts_path, plan.split, tmp / "pairs", pairs_map, plan.texts)
        imgs_map = map_size or _initial_map_size(plan.images.map_bytes)
        result.n_images = _write_images(plan.imgs_path, plan.split, tmp / "imgs", imgs_map, plan.images.bad_lines)
        if result.dropped:
            payload = {
                "status": "built with rows dropped (--skip-bad)",
                "dropped": [p.to_json() for p in plan.problems],
            }
            _write_report(tmp / "build_report.json", payload)
        results.append(result)
    return results


def _initial_map_size(estimate: int) -> int:
    return int(estimate * 1.25) + (4 << 20)


def _write_ahead(
    data_dir: Path, split: str, tmp: Path, result: SplitResult, map_size: int | None, pairs: PairWriter, texts: TextScan
) -> None:
    """Finish one split's pairs (written as the texts were parsed) and write its images while they are still being
    checked; texts with problems stop here, as the build fails anyway."""
    if texts.problems:
        pairs.abandon()
        return
    imgs_path, _ = _split_files(data_dir, split)
    result.n_texts = texts.n_texts
    result.n_pairs = pairs.close()
    result.n_images = _write_images(imgs_path, split, tmp / "imgs", map_size or _estimate(imgs_path, 1.1), set())


def _build_speculative(
    data_dir: Path, splits: Sequence[str], lmdb_dir: Path, opts: dict, stack
) -> tuple[list[SplitPlan], list[SplitResult]]:
    """Default mode: write each split while the workers validate it; any problem discards every temp dir."""
    from cn_clip.fileio import atomic_dir

    plans, results = [], []
    pool = stack.enter_context(_pool(opts["workers"]))
    for split in splits:
        tmp = stack.enter_context(atomic_dir(lmdb_dir / split, overwrite=True))
        result = SplitResult(split, lmdb_dir / split)
        _, texts_path = _split_files(data_dir, split)
        pairs = PairWriter(tmp / "pairs", opts["map_size"] or _estimate(texts_path, 3.0))
        write = functools.partial(_write_ahead, data_dir, split, tmp, result, opts["map_size"], pairs)
        plan = _plan_split(
            data_dir, split, opts["check_images"], pool, opts["workers"], on_record=pairs.add, while_scanning=write
        )
        plans.append(plan)
        results.append(result)
    return plans, results


@contextlib.contextmanager
def _write_failures_named(lmdb_dir: Path) -> Iterator[None]:
    """A full disk or an LMDB write error becomes one DataError; the temp dirs are already gone by then."""
    import lmdb

    try:
        yield
    except lmdb.Error as exc:
        raise DataError(f"writing the LMDB under {lmdb_dir} failed ({exc}); nothing was written") from exc
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise DataError(f"no space left while writing the LMDB under {lmdb_dir}; nothing was written") from exc


def build_lmdb(
    data_dir: str | Path,
    splits: Sequence[str],
    lmdb_dir: str | Path | None = None,
    *,
    overwrite: bool = False,
    skip_bad: bool = False,
    check_images: str = "header",
    workers: int | None = None,
    map_size: int | None = None,
    report: str | Path | None = None,
) -> list[SplitResult]:
    """Validate every split and build each into ``lmdb_dir/split``; raise DataError listing all problems.

    ``check_images``: ``header`` (Pillow opens the image), ``full`` (also decodes pixels) or ``off`` (base64 only).
    With ``skip_bad`` bad rows (and pairs naming a bad or missing image) are dropped and listed in
    ``{split}/build_report.json`` instead. Targets are replaced only after every split validated and was written.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"The data_dir does not exist! Please check the input args... ({data_dir})")
    lmdb_dir = Path(lmdb_dir) if lmdb_dir else data_dir / "lmdb"
    report_path = Path(report) if report else None
    workers = _resolve_workers(workers)
    _check_targets(lmdb_dir, splits, overwrite)
    _raise_missing_files(data_dir, splits)
    start = time.perf_counter()
    with _write_failures_named(lmdb_dir), contextlib.ExitStack() as stack:
        # Unwinding the stack renames every temp dir into place, or removes them all on error.
        if skip_bad:
            plans = validate_splits(data_dir, splits, check_images=check_images, workers=workers)
            results = _build_validated(plans, lmdb_dir, map_size, stack)
        else:
            opts = {"workers": workers, "check_images": check_images, "map_size": map_size}
            plans, results = _build_speculative(data_dir, splits, lmdb_dir, opts, stack)
            _fail_on_problems(plans, report_path)
    dropped = [p for result in results for p in result.dropped]
    if dropped:
        _logger.warning("--skip-bad dropped %d row(s):\n%s", len(dropped), format_problems(dropped))
        if report_path:
            _write_report(report_path, {"status": "built", "dropped": [p.to_json() for p in dropped]})
    _logger.info("built %d split(s) in %.2f s", len(results), time.perf_counter() - start)
    return results
