"""Recall scoring of a prediction file; same CLI, console lines and output JSON as the reference evaluation.py.

``python -m cn_clip.eval.evaluation GROUND_TRUTH.jsonl PREDICTIONS.jsonl OUTPUT.json``. Any failure (a broken rule,
an unreadable file) still writes the failure JSON and prints ``The evaluation failed: …``; the exit code is then 1.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from typing import Any

from cn_clip.eval.directions import Direction, get_direction
from cn_clip.eval.metrics import (
    compute_score,
    error_json,
    read_ground_truth,
    read_submission,
    recall_at_k,
    score_json,
)
from cn_clip.fileio import atomic_write

__all__ = ["compute_score", "evaluate", "main"]


def _message(exc: BaseException) -> str:
    """The text for the failure JSON: the exception's message, never its errno or codec name (reference bug)."""
    if len(exc.args) == 1 and isinstance(exc.args[0], str):
        return exc.args[0]
    return str(exc) or type(exc).__name__


def _dump(info: dict[str, Any], path: str | os.PathLike) -> None:
    with atomic_write(path) as handle:
        json.dump(info, handle)


def evaluate(
    standard_path: str | os.PathLike,
    submit_path: str | os.PathLike,
    out_path: str | os.PathLike,
    direction: str | Direction = "text_to_image",
) -> dict[str, Any]:
    """Score ``submit_path`` against ``standard_path``, write the reference's JSON to ``out_path`` and return it."""
    spec = get_direction(direction)
    print(f"Read standard from {standard_path}")
    print(f"Read user submit file from {submit_path}")
    try:
        truth = read_ground_truth(standard_path, spec)
        result = score_json(recall_at_k(read_submission(submit_path, truth, spec), truth))
    except Exception as exc:  # noqa: BLE001 - the contract: every failure becomes the failure JSON
        message = _message(exc)
        result = error_json(message)
        _dump(result, out_path)
        print(f"The evaluation failed: {message}")
        return result
    _dump(result, out_path)
    print("The evaluation finished successfully.")
    return result


def build_parser(direction: Direction) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=f"Recall@1/5/10 of {direction.name.replace('_', '-')} predictions.")
    parser.add_argument("standard_path", help=f"ground truth JSONL ({direction.query_key} → {direction.target_key})")
    parser.add_argument("submit_path", help="predictions JSONL (from make_topk_predictions)")
    parser.add_argument("out_path", help="output JSON")
    return parser


def main(argv: Sequence[str] | None = None, direction: str = "text_to_image") -> int:
    spec = get_direction(direction)
    args = build_parser(spec).parse_args(argv)
    result = evaluate(args.standard_path, args.submit_path, args.out_path, spec)
    return 0 if result["success"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
