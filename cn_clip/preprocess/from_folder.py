"""Image folder + captions (CSV/JSONL of ``image_path,caption``) → raw ``{split}_imgs.tsv`` / ``{split}_texts.jsonl``.

    python -m cn_clip.preprocess.from_folder --images photos/ --captions captions.csv --out DATAPATH/datasets/Mine \
        --split-ratios 0.8,0.1,0.1 --max-side 512

One image id per distinct image path (1, 2, … in first-appearance order) and one text id per caption line; a caption
row may carry a ``split`` column, otherwise images (not captions) are split by a seeded shuffle, so every caption of an
image lands in the same split. Without ``--max-side``/``--reencode`` the file bytes are stored as they are.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import random
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from cn_clip.cli.runner import run_cli, setup_logging
from cn_clip.errors import ConfigError, DataError

_logger = logging.getLogger(__name__)
SPLITS = ("train", "valid", "test")
PATH_COLUMNS = ("image_path", "image", "path", "file")
CAPTION_COLUMNS = ("caption", "text")


@dataclass
class Caption:
    line: int
    image_path: str
    caption: str
    split: str | None


def _pick(row: dict, names: Sequence[str]) -> str | None:
    for name in names:
        if row.get(name) not in (None, ""):
            return str(row[name])
    return None


def _rows(path: Path) -> list[tuple[int, dict]]:
    if path.suffix.lower() in (".jsonl", ".json"):
        rows = []
        for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rows.append((line_no, json.loads(line)))
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path.name}:{line_no}: invalid JSON ({exc.msg})") from None
        return rows
    with open(path, encoding="utf-8-sig", newline="") as handle:
        dialect = "excel-tab" if path.suffix.lower() == ".tsv" else "excel"
        return [(line_no, row) for line_no, row in enumerate(csv.DictReader(handle, dialect=dialect), 2)]


def read_captions(path: str | Path) -> list[Caption]:
    """Caption rows with their line numbers; every missing column or empty value is reported at once."""
    path = Path(path)
    captions, problems = [], []
    for line_no, row in _rows(path):
        if not isinstance(row, dict):
            problems.append(f"{path.name}:{line_no}: expected an object with image_path and caption")
            continue
        image_path, caption = _pick(row, PATH_COLUMNS), _pick(row, CAPTION_COLUMNS)
        if image_path is None or caption is None:
            problems.append(f"{path.name}:{line_no}: needs an image_path and a caption")
            continue
        split = row.get("split") or None
        if split is not None and split not in SPLITS:
            problems.append(f"{path.name}:{line_no}: split {split!r} is not one of {', '.join(SPLITS)}")
            continue
        captions.append(Caption(line_no, image_path, caption, split))
    if problems:
        listed = "\n  ".join(problems[:20])
        raise DataError(f"{len(problems)} problem(s) in {path.name}:\n  {listed}")
    if not captions:
        raise DataError(f"{path}: no captions")
    return captions


def assign_splits(paths: Sequence[str], ratios: Sequence[float], seed: int) -> dict[str, str]:
    """Deterministic image → split: a seeded shuffle cut by ``ratios`` (train, valid, test)."""
    order = sorted(paths)
    random.Random(seed).shuffle(order)
    total = sum(ratios)
    n_train = round(len(order) * ratios[0] / total)
    n_valid = round(len(order) * ratios[1] / total)
    names = ["train"] * n_train + ["valid"] * n_valid
    names += ["test"] * (len(order) - len(names))
    return dict(zip(order, names, strict=True))


def encode_image(path: Path, max_side: int | None, reencode: bool, quality: int) -> bytes:
    """File bytes, or a JPEG re-encode (after shrinking the longer side to ``max_side``)."""
    from PIL import Image, ImageOps

    raw = path.read_bytes()
    try:
        with Image.open(io.BytesIO(raw)) as img:
            if not reencode and (max_side is None or max(img.size) <= max_side):
                img.verify()
                return raw
            img = ImageOps.exif_transpose(img).convert("RGB")
            if max_side is not None and max(img.size) > max_side:
                img.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
            out = io.BytesIO()
            img.save(out, "JPEG", quality=quality)
            return out.getvalue()
    except Exception as exc:  # Pillow raises many unrelated types for bad files
        raise DataError(f"{path}: not an image Pillow can open ({type(exc).__name__}: {exc})") from None


def convert(
    images_dir: str | Path,
    captions_file: str | Path,
    out_dir: str | Path,
    ratios: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    max_side: int | None = None,
    reencode: bool = False,
    quality: int = 90,
    workers: int = 4,
) -> dict[str, dict[str, int]]:
    """Write the raw splits; returns ``{split: {"images": n, "texts": n}}``."""
    from cn_clip.data.formats import b64encode_image
    from cn_clip.fileio import atomic_write

    images_dir, out_dir = Path(images_dir), Path(out_dir)
    captions = read_captions(captions_file)
    paths = list(dict.fromkeys(c.image_path for c in captions))
    missing = [p for p in paths if not (images_dir / p).is_file()]
    if missing:
        raise DataError(f"{len(missing)} image file(s) not found under {images_dir}: {', '.join(missing[:10])}")
    image_ids = {p: i for i, p in enumerate(paths, 1)}
    fixed = {c.image_path: c.split for c in captions if c.split}
    split_of = assign_splits([p for p in paths if p not in fixed], ratios, seed) | fixed
    with ThreadPoolExecutor(max_workers=workers) as pool:  # Pillow releases the GIL while decoding/encoding
        encoded = pool.map(lambda p: encode_image(images_dir / p, max_side, reencode, quality), paths)
        by_split: dict[str, list[str]] = {split: [] for split in SPLITS}
        for path, raw in zip(paths, encoded, strict=True):
            by_split[split_of[path]].append(f"{image_ids[path]}\t{b64encode_image(raw)}\n")
    summary = {}
    for split in SPLITS:
        texts = [c for c in captions if split_of[c.image_path] == split]
        with atomic_write(out_dir / f"{split}_imgs.tsv") as handle:
            handle.writelines(by_split[split])
        with atomic_write(out_dir / f"{split}_texts.jsonl") as handle:
            for text_id, c in enumerate(captions, 1):
                if split_of[c.image_path] == split:
                    record = {"text_id": text_id, "text": c.caption, "image_ids": [image_ids[c.image_path]]}
                    handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        summary[split] = {"images": len(by_split[split]), "texts": len(texts)}
    with atomic_write(out_dir / "image_paths.tsv") as handle:
        handle.writelines(f"{image_ids[p]}\t{p}\n" for p in paths)
    return summary


def _ratios(value: str) -> tuple[float, float, float]:
    try:
        parts = tuple(float(part) for part in value.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--split-ratios {value!r}: expected three numbers like 0.8,0.1,0.1") from None
    if len(parts) != 3 or min(parts) < 0 or sum(parts) <= 0:
        raise argparse.ArgumentTypeError(f"--split-ratios {value!r}: expected three non-negative numbers")
    return parts


def main(argv: Sequence[str] | None = None) -> int:
    setup_logging()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", required=True, help="folder the caption file's image paths are relative to")
    parser.add_argument("--captions", required=True, help="CSV/TSV (header: image_path,caption[,split]) or JSONL")
    parser.add_argument("--out", required=True, help="output dataset dir ({split}_imgs.tsv, {split}_texts.jsonl)")
    parser.add_argument("--split-ratios", type=_ratios, default=(0.8, 0.1, 0.1), help="train,valid,test shares")
    parser.add_argument("--seed", type=int, default=0, help="seed of the image shuffle that assigns splits")
    parser.add_argument("--max-side", type=int, default=None, help="shrink longer image sides to this, as JPEG")
    parser.add_argument("--reencode", action="store_true", help="re-encode every image as JPEG")
    parser.add_argument("--jpeg-quality", type=int, default=90)
    args = parser.parse_args(argv)
    if args.max_side is not None and args.max_side < 1:
        raise ConfigError("--max-side must be positive")
    summary = convert(
        args.images,
        args.captions,
        args.out,
        ratios=args.split_ratios,
        seed=args.seed,
        max_side=args.max_side,
        reencode=args.reencode,
        quality=args.jpeg_quality,
    )
    for split, counts in summary.items():
        print(f"{split}: {counts['images']} images, {counts['texts']} texts")
    print(
        f"Wrote {args.out}; next: python -m cn_clip.preprocess.build_lmdb_dataset --data_dir {args.out} "
        "--splits train,valid,test"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
