"""Top-k retrieval predictions from feature files; same CLI and output lines as the reference script.

``python -m cn_clip.eval.make_topk_predictions --image-feats I --text-feats T --output P`` writes, per text in
file order, ``{"text_id": t, "image_ids": [...]}`` (``make_topk_predictions_tr``: per image, ``text_ids``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Sequence

from cn_clip.cli.args import add_device_arg
from cn_clip.cli.runner import run_cli, setup_logging
from cn_clip.eval.directions import Direction, get_direction
from cn_clip.eval.featio import FeatureId, read_feature_files
from cn_clip.eval.topk import BACKENDS, DEFAULT_GALLERY_CHUNK, resolve_backend, topk_search
from cn_clip.fileio import atomic_write

_logger = logging.getLogger(__name__)


def build_parser(direction: Direction) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=f"Top-k {direction.name.replace('_', '-')} predictions from image and text feature files "
        "(reference JSONL or .npy, see docs/eval.md)."
    )
    parser.add_argument("--image-feats", type=str, required=True, help="image feature file (.jsonl or .npy)")
    parser.add_argument("--text-feats", type=str, required=True, help="text feature file (.jsonl or .npy)")
    parser.add_argument("--top-k", type=int, default=10, help="number of predictions per query (default 10)")
    parser.add_argument(
        "--eval-batch-size",
        type=int,
        default=DEFAULT_GALLERY_CHUNK,
        help="gallery rows scored per chunk (default 32768); bounds memory together with --query-batch-size",
    )
    parser.add_argument("--output", type=str, required=True, help="output JSONL prediction file")
    parser.add_argument(
        "--query-batch-size", type=int, default=None, help="query rows per chunk (default: ~8M scores per chunk)"
    )
    parser.add_argument(
        "--backend", choices=BACKENDS, default="auto", help="auto = numpy on CPU, torch on other devices"
    )
    add_device_arg(parser)  # where the torch back end runs
    parser.add_argument(
        "--calibration", default=None, help="calib.json (cn_clip.eval.calibrate): add a 'probabilities' list per line"
    )
    return parser


def make_topk_predictions(
    image_feats: str | os.PathLike,
    text_feats: str | os.PathLike,
    output: str | os.PathLike,
    *,
    top_k: int = 10,
    direction: str | Direction = "text_to_image",
    backend: str = "auto",
    device: str | None = None,
    gallery_chunk: int = DEFAULT_GALLERY_CHUNK,
    query_chunk: int | None = None,
    calibration: str | os.PathLike | None = None,
) -> int:
    """Write one prediction line per query (query-file order); return the number of lines written.

    With ``calibration`` (a ``calib.json``) each line also gets ``"probabilities"``, parallel to the ranked ids."""
    direction = get_direction(direction)
    paths = {"image_id": image_feats, "text_id": text_feats}
    gallery, queries = read_feature_files(
        [(paths[direction.gallery_key], direction.gallery_key), (paths[direction.query_key], direction.query_key)]
    )
    if top_k > len(gallery):
        _logger.warning(
            "top-k %d > %d gallery %s: every line lists all of them", top_k, len(gallery), direction.gallery_noun
        )
    result = topk_search(
        queries.matrix,
        gallery.matrix,
        top_k,
        backend=backend,
        device=device,
        gallery_chunk=gallery_chunk,
        query_chunk=query_chunk,
    )
    probabilities = None
    if calibration is not None:
        from cn_clip.eval.calibrate import Calibrator

        calibrator = Calibrator.load(calibration)
        log_norm = calibrator.log_normaliser(queries.matrix, gallery.matrix) if calibrator.per_row else None
        probabilities = calibrator.probabilities_of_hits(result.scores, log_norm).tolist()
    write_predictions(output, direction, queries.ids, gallery.ids, result.indices.tolist(), probabilities)
    return len(queries)


def write_predictions(
    output: str | os.PathLike,
    direction: Direction,
    query_ids: Sequence[FeatureId],
    gallery_ids: Sequence[FeatureId],
    ranked: Sequence[Sequence[int]],
    probabilities: Sequence[Sequence[float]] | None = None,
) -> None:
    """Lines byte-identical to the reference's ``json.dumps({query_key: q, target_key: [...]})``; with
    ``probabilities``, a ``"probabilities"`` list (6 decimals) follows the ids."""
    gallery_json = [json.dumps(item) for item in gallery_ids]  # each id encoded once, not once per hit
    head = '{"' + direction.query_key + '": '
    middle = ', "' + direction.target_key + '": ['
    lines = (
        head + json.dumps(qid) + middle + ", ".join([gallery_json[j] for j in row]) + "]"
        for qid, row in zip(query_ids, ranked, strict=True)
    )
    if probabilities is not None:
        tails = (', "probabilities": [' + ", ".join(f"{p:.6f}" for p in row) + "]}\n" for row in probabilities)
    else:
        tails = ("}\n" for _ in query_ids)
    with atomic_write(output) as handle:
        handle.writelines(line + tail for line, tail in zip(lines, tails, strict=True))


def main(argv: Sequence[str] | None = None, direction: str = "text_to_image") -> int:
    spec = get_direction(direction)

    def run(args_list: Sequence[str] | None) -> int:
        from cn_clip.runtime import resolve_device

        parser = build_parser(spec)
        args = parser.parse_args(args_list)
        _logger.info("params: %s", ", ".join(f"{k}={v}" for k, v in sorted(vars(args).items())))
        if args.top_k < 1 or args.eval_batch_size < 1 or (args.query_batch_size or 1) < 1:
            parser.error("--top-k, --eval-batch-size and --query-batch-size must be positive")
        device = resolve_device(args.device)
        try:
            resolve_backend(args.backend, device)
        except ValueError as exc:
            parser.error(str(exc))
        make_topk_predictions(
            args.image_feats,
            args.text_feats,
            args.output,
            top_k=args.top_k,
            direction=spec,
            backend=args.backend,
            device=device,
            gallery_chunk=args.eval_batch_size,
            query_chunk=args.query_batch_size,
            calibration=args.calibration,
        )
        print(f"Top-{args.top_k} predictions are saved in {args.output}")
        print("Done!")
        return 0

    setup_logging()
    return run_cli(run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
