"""Write the images of an ``imgs`` LMDB or a ``{split}_imgs.tsv`` back to files, for inspection.

    python -m cn_clip.preprocess.export_images DATAPATH/datasets/MUGE/lmdb/valid/imgs --out /tmp/valid_imgs --limit 50

Files are named ``{image_id}.{ext}`` with the extension of the detected format (``.bin`` if Pillow cannot tell);
the bytes are exactly the decoded base64, nothing is re-encoded.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

from cn_clip.cli.runner import run_cli, setup_logging
from cn_clip.errors import DataError

_logger = logging.getLogger(__name__)
_EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "GIF": "gif", "WEBP": "webp", "BMP": "bmp", "TIFF": "tif"}


def iter_source(source: Path) -> Iterator[tuple[str, bytes]]:
    """(image id, base64) pairs of an LMDB dir (key order, count key skipped) or a TSV (file order)."""
    from cn_clip.data import formats

    if source.is_dir():
        import lmdb

        env = lmdb.open(str(source), readonly=True, lock=False, readahead=False)
        try:
            with env.begin() as txn:
                for key, value in txn.cursor():
                    if key != formats.NUM_IMAGES_KEY:
                        yield key.decode("utf-8"), bytes(value)
        finally:
            env.close()
        return
    with open(source, "rb") as handle:
        for line_no, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                raw_id, value = formats.split_tsv_line(line)
            except ValueError as exc:
                raise DataError(f"{source.name}:{line_no}: {exc}") from None
            yield raw_id.decode("utf-8"), value


def _safe_name(image_id: str) -> str:
    name = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in image_id)
    return name.lstrip(".") or "_"


def export(source: str | Path, out_dir: str | Path, limit: int | None = None, ids: set[str] | None = None) -> int:
    """Decode and write images; returns how many were written."""
    from cn_clip.data import formats

    source, out_dir = Path(source), Path(out_dir)
    if not source.exists():
        raise DataError(f"{source} does not exist (expected an imgs LMDB directory or a *_imgs.tsv file)")
    out_dir.mkdir(parents=True, exist_ok=True)
    written = 0
    for image_id, value in iter_source(source):
        if ids is not None and image_id not in ids:
            continue
        try:
            raw = formats.b64decode_image(value)
        except ValueError as exc:
            raise DataError(f"image_id {image_id}: invalid base64 ({exc})") from None
        ext = _EXTENSIONS.get(formats.sniff_format(raw) or "", "bin")
        (out_dir / f"{_safe_name(image_id)}.{ext}").write_bytes(raw)
        written += 1
        if limit is not None and written >= limit:
            break
    return written


def main(argv: Sequence[str] | None = None) -> int:
    setup_logging()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="an imgs LMDB directory (…/lmdb/valid/imgs) or a {split}_imgs.tsv")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--limit", type=int, default=None, help="stop after this many images")
    parser.add_argument("--ids", default=None, help="comma-separated image ids to export (default: all)")
    args = parser.parse_args(argv)
    ids = {part.strip() for part in args.ids.split(",")} if args.ids else None
    count = export(args.source, args.out, limit=args.limit, ids=ids)
    print(f"Exported {count} images into {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
