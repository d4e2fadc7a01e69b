"""LMDB builder benchmark: cn_clip (validating) vs the reference builder (cn-clip 1.6.0, its own venv) on one input.

    .venv/bin/python benchmarks/build_lmdb.py --images 5000 50000 --repeats 3

Generates ``N`` base64 JPEGs of 256×256 (~24 KB each, like compatibility.md#baselines) plus one caption per image, then
times each builder as a fresh subprocess (interpreter start included, after an ``os.sync()`` so that no build pays for
the previous one's dirty pages), interleaved and rotated, and prints a table naming the machine.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import reference  # benchmarks/reference.py: where the reference venv is

REPO = Path(__file__).resolve().parents[1]
REF_PYTHON = Path(reference.REF_PYTHON)
WORDS = (
    "红色",
    "蓝色",
    "一只",
    "小猫",
    "狗",
    "汽车",
    "风景",
    "山",
    "海边",
    "城市",
    "夜晚",
    "花朵",
    "女士",
    "男士",
    "包包",
    "连衣裙",
    "手机壳",
    "咖啡",
    "杯子",
    "照片",
)


def _base_jpegs(count: int, seed: int) -> list[bytes]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        low = (rng.random((48, 48, 3)) * 255).astype("uint8")
        img = Image.fromarray(low).resize((256, 256), Image.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=80)
        images.append(buf.getvalue())
    return images


def generate(data_dir: Path, n_images: int, seed: int = 0) -> None:
    """Write ``train_imgs.tsv`` / ``train_texts.jsonl`` with ``n_images`` images and as many captions."""
    import base64
    import random

    data_dir.mkdir(parents=True, exist_ok=True)
    b64s = [base64.b64encode(raw) for raw in _base_jpegs(64, seed)]
    rng = random.Random(seed)
    with open(data_dir / "train_imgs.tsv", "wb") as tsv:
        for image_id in range(n_images):
            tsv.write(b"%d\t%s\n" % (1000000 + image_id, b64s[image_id % len(b64s)]))
    with open(data_dir / "train_texts.jsonl", "w", encoding="utf-8") as jsonl:
        for text_id in range(n_images):
            text = "".join(rng.choices(WORDS, k=rng.randint(3, 8)))
            record = {"text_id": text_id, "text": text, "image_ids": [1000000 + text_id]}
            jsonl.write(json.dumps(record, ensure_ascii=False) + "\n")


def _run(cmd: list[str], cwd: Path) -> tuple[float, float, int]:
    """Wall seconds, CPU seconds (user + sys, all processes) and peak RSS (bytes) of one command."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, cmd)
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024


def _commands(data_dir: Path, out: Path) -> dict[str, list[str]]:
    common = ["--data_dir", str(data_dir), "--splits", "train", "--lmdb_dir", str(out)]
    module = ["-m", "cn_clip.preprocess.build_lmdb_dataset"]
    cmds = {
        "cn_clip (default: validating)": [sys.executable, *module, *common],
        "cn_clip --workers 2": [sys.executable, *module, *common, "--workers", "2"],
        "cn_clip --no-check-images": [sys.executable, *module, *common, "--no-check-images"],
    }
    if REF_PYTHON.exists():
        cmds["reference cn-clip 1.6.0"] = [str(REF_PYTHON), *module, *common]
    return cmds


def balanced_order(n: int, repeat: int) -> list[int]:
    """Row ``repeat`` of a Williams (balanced Latin) square: over n repeats (n even) every builder runs in every
    position and right after every other builder once. A build is slower right after some builders (the
    reference's leaves the page cache in another state), so plain rotation, which keeps the cyclic order, is not
    enough."""
    first, low, high = [0], 1, n - 1
    while len(first) < n:
        first.append(low)
        low += 1
        if len(first) < n:
            first.append(high)
            high -= 1
    return [(value + repeat) % n for value in first]


def _cwd_for(name: str, scratch: Path) -> Path:
    # The reference must not import this checkout's cn_clip: run it from an empty directory.
    return scratch if name.startswith("reference") else REPO


def bench(n_images: int, repeats: int, root: Path) -> list[tuple]:
    data_dir = root / f"raw{n_images}"
    generate(data_dir, n_images)
    tsv_mb = (data_dir / "train_imgs.tsv").stat().st_size / 1e6
    print(f"# {n_images} images, TSV {tsv_mb:.1f} MB", flush=True)
    runs: dict[str, list[tuple[float, float, int]]] = {}
    sizes: dict[str, int] = {}
    commands = list(_commands(data_dir, root / "out").items())
    for repeat in range(repeats):  # interleaved, so load changes hit every builder alike, in a balanced order
        for name, cmd in (commands[i] for i in balanced_order(len(commands), repeat)):
            shutil.rmtree(root / "out", ignore_errors=True)
            os.sync()  # the previous build's dirty pages are written back now, not during this one
            runs.setdefault(name, []).append(_run(cmd, _cwd_for(name, root)))
            sizes[name] = (root / "out" / "train" / "imgs" / "data.mdb").stat().st_size
    shutil.rmtree(data_dir)
    shutil.rmtree(root / "out", ignore_errors=True)
    rows = []
    for name, results in runs.items():
        walls, cpus, rss = zip(*results, strict=True)
        rows.append(
            (name, n_images, statistics.median(walls), min(walls), statistics.median(cpus), max(rss), sizes[name])
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, nargs="+", default=[5000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tmp", default=None, help="scratch directory (default: system temp)")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        for n_images in args.images:
            rows += bench(n_images, args.repeats, Path(tmp))
    cpu = platform.processor() or platform.machine()
    print(f"\nmachine: {cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, {platform.system()}")
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")
    print("| builder | images | median wall s | min wall s | median CPU s | peak RSS MB | imgs/data.mdb bytes |")
    print("|---|---|---|---|---|---|---|")
    for name, n_images, median, best, cpu_s, rss, size in rows:
        print(f"| {name} | {n_images} | {median:.2f} | {best:.2f} | {cpu_s:.2f} | {rss / 2**20:.0f} | {size:,} |")


if __name__ == "__main__":
    main()
