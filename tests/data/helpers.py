"""Helpers for the data tests: tiny raw datasets written in the reference layout."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "lmdb_parity"


def image_bytes(seed: int = 0, fmt: str = "PNG", size: tuple[int, int] = (8, 6), mode: str = "RGB") -> bytes:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    img = Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype("uint8")).convert(mode)
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def write_split(
    data_dir: Path,
    split: str,
    images: list[tuple[object, bytes]] | None = None,
    texts: list[dict] | None = None,
    imgs_lines: list[str] | None = None,
    texts_lines: list[str] | None = None,
) -> None:
    """Write ``{split}_imgs.tsv`` / ``{split}_texts.jsonl``; ``*_lines`` are appended verbatim (for bad rows)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    lines = [f"{image_id}\t{b64(raw)}" for image_id, raw in images or []] + list(imgs_lines or [])
    (data_dir / f"{split}_imgs.tsv").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    records = [json.dumps(text, ensure_ascii=False) for text in texts or []] + list(texts_lines or [])
    (data_dir / f"{split}_texts.jsonl").write_text("".join(line + "\n" for line in records), encoding="utf-8")


def good_split(data_dir: Path, split: str = "train", n: int = 3) -> None:
    images = [(100 + i, image_bytes(i)) for i in range(n)]
    texts = [{"text_id": i, "text": f"第{i}张图片", "image_ids": [100 + i]} for i in range(n)]
    write_split(data_dir, split, images, texts)


def lmdb_items(path: Path) -> dict[bytes, bytes]:
    import lmdb

    env = lmdb.open(str(path), readonly=True, lock=False)
    with env.begin() as txn:
        items = {bytes(k): bytes(v) for k, v in txn.cursor()}
    env.close()
    return items


def leftovers(lmdb_dir: Path) -> list[str]:
    return sorted(p.name for p in lmdb_dir.iterdir()) if lmdb_dir.exists() else []
