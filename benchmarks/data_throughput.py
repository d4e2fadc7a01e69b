"""Training-loader throughput: samples/s delivered (read, decode, transform, collate) from LMDB, WebDataset shards and
a CSV of image files holding the same pairs, with 0, 2 and 4 DataLoader workers.

    .venv/bin/python benchmarks/data_throughput.py --images 50000 --batches 30 --workers 0 2 4

The three sources are built from one generated raw split (256×256 JPEGs, ~24 KB, as benchmarks/build_lmdb.py):
``build_lmdb``, ``build_webdataset`` (1,000 samples a shard) and one file per image plus a CSV. Each row times
``--batches`` batches of 64 after the first (worker start-up excluded) from :func:`cn_clip.data.loader.get_data`
with shuffling on, as training reads them; the sources are interleaved per worker count so load changes hit all.
"""

from __future__ import annotations

import argparse
import base64
import csv
import importlib.util
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("build_lmdb_bench", HERE / "build_lmdb.py")
BUILD = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(BUILD)


def prepare(root: Path, n_images: int) -> dict[str, str]:
    """Raw split → LMDB, shards and a CSV of files; returns each source's ``--train-data``."""
    from cn_clip.data.lmdb_build import build_lmdb
    from cn_clip.data.wds_build import build_webdataset

    raw = root / "raw"
    BUILD.generate(raw, n_images)
    build_lmdb(raw, ["train"], root / "lmdb")
    build_webdataset(raw, ["train"], root / "wds", shard_size=1000)
    photos = root / "photos"
    photos.mkdir()
    captions = {}
    with open(raw / "train_texts.jsonl", encoding="utf-8") as texts:
        for line in texts:
            record = json.loads(line)
            captions[record["image_ids"][0]] = (record["text_id"], record["text"])
    with open(raw / "train_imgs.tsv", "rb") as tsv, open(root / "train.csv", "w", newline="", encoding="utf-8") as out:
        writer = csv.writer(out)
        writer.writerow(["filepath", "title", "image_id", "text_id"])
        for line in tsv:
            image_id, b64 = line.rstrip(b"\n").split(b"\t")
            name = f"photos/{image_id.decode()}.jpg"
            (root / name).write_bytes(base64.b64decode(b64))
            text_id, text = captions[int(image_id)]
            writer.writerow([name, text, int(image_id), text_id])
    shutil.rmtree(raw)
    return sources_in(root)


def sources_in(root: Path) -> dict[str, str]:
    return {
        "LMDB": str(root / "lmdb" / "train"),
        "WebDataset": str(root / "wds" / "train.txt"),
        "CSV": str(root / "train.csv"),
    }


def throughput(path: str, workers: int, batches: int, batch_size: int) -> float:
    from cn_clip.data.loader import DataCfg, SplitCfg, get_data

    info = get_data(DataCfg(SplitCfg(path, batch_size, workers)), 1, 0, 224)["train"]
    info.sampler.set_epoch(0)
    iterator = iter(info.dataloader)
    next(iterator)  # worker start-up and first fetch not timed
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    elapsed = time.perf_counter() - start
    del iterator
    return batches * batch_size / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=50000)
    parser.add_argument("--batches", type=int, default=30, help="timed batches per row")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2, 4])
    parser.add_argument("--tmp", default=None, help="scratch directory (default: system temp)")
    parser.add_argument("--keep", default=None, help="build the sources here and keep them (reused when present)")
    args = parser.parse_args()
    import logging

    import torch

    logging.basicConfig(level=logging.WARNING)
    # With 0 workers the main process decodes; one intra-op thread, as in a DataLoader worker, keeps OpenMP from
    # spinning against the other jobs of a shared machine (2 threads there measured 10x slower).
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        root = Path(args.keep or tmp)
        start = time.perf_counter()
        sources = sources_in(root) if (root / "train.csv").is_file() else prepare(root, args.images)
        print(f"# {args.images} images: sources ready in {time.perf_counter() - start:.0f} s", flush=True)
        rows = []
        for workers in args.workers:
            for name, path in sources.items():
                rate = throughput(path, workers, args.batches, args.batch_size)
                rows.append((name, workers, rate))
                print(f"  {name} workers={workers}: {rate:.0f} samples/s", flush=True)
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")
    print(f"{args.images} images, batch {args.batch_size}, {args.batches} timed batches per row\n")
    print("| source | workers | samples/s |\n|---|---|---|")
    for name, workers, rate in rows:
        print(f"| {name} | {workers} | {rate:.0f} |")


if __name__ == "__main__":
    main()
