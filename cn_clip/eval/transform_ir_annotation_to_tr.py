"""Text→image ground truth → image→text ground truth (``X.jsonl`` → ``X.tr.jsonl``), as the reference script.

Images are listed in order of first appearance, each with its texts in file order; images without texts are absent.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from cn_clip.cli.runner import run_cli, setup_logging
from cn_clip.errors import DataError
from cn_clip.fileio import atomic_write


def invert_annotations(pairs: Iterable[tuple[Any, Sequence[Any]]]) -> dict[Any, list]:
    """``(text_id, image_ids)`` pairs → ``image_id → text_ids`` (first-appearance order)."""
    inverted: dict[Any, list] = {}
    for text_id, image_ids in pairs:
        for image_id in image_ids:
            inverted.setdefault(image_id, []).append(text_id)
    return inverted


def read_annotation_pairs(path: str | os.PathLike) -> list[tuple[Any, list]]:
    """Every ``(text_id, image_ids)`` line in file order (repeated text ids kept, as the reference does)."""
    pairs = []
    with open(path, encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, 1):
            try:
                obj = json.loads(line.strip())
            except ValueError as exc:
                raise DataError(f"{path}:{lineno}: not a JSON object: {exc}") from None
            if not isinstance(obj, dict) or "text_id" not in obj or not isinstance(obj.get("image_ids"), list):
                raise DataError(f'{path}:{lineno}: expected {{"text_id": ..., "image_ids": [...]}}')
            pairs.append((obj["text_id"], obj["image_ids"]))
    return pairs


def tr_path_for(path: str | os.PathLike) -> Path:
    """``valid_texts.jsonl`` → ``valid_texts.tr.jsonl`` (only a trailing ``.jsonl`` is replaced)."""
    return Path(str(path).removesuffix(".jsonl") + ".tr.jsonl")


def transform(path: str | os.PathLike) -> Path:
    inverted = invert_annotations(read_annotation_pairs(path))
    output = tr_path_for(path)
    with atomic_write(output) as handle:
        for image_id, text_ids in inverted.items():
            handle.write(json.dumps({"image_id": image_id, "text_ids": text_ids}) + "\n")
    return output


def main(argv: Sequence[str] | None = None) -> int:
    def run(args_list: Sequence[str] | None) -> int:
        parser = argparse.ArgumentParser(description="Write the image→text ground truth X.tr.jsonl beside X.jsonl.")
        parser.add_argument("--input", type=str, required=True, help="text→image annotation JSONL")
        args = parser.parse_args(args_list)
        transform(args.input)
        print("Done!")
        return 0

    setup_logging()
    return run_cli(run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
