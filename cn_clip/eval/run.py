"""One-command retrieval evaluation: features → top-k both directions → recall scoring, one table.

``python -m cn_clip.eval.run --data D --split valid --resume CKPT --vision-model ViT-B-16 --text-model
RoBERTa-wwm-ext-base-chinese`` where ``D`` holds the reference layout ``{split}_texts.jsonl`` and
``lmdb/{split}/imgs``. ``--data`` may instead be WebDataset shards or a CSV/JSONL of image files
(``--dataset-type``, docs/data.md): their image-caption pairs become ``{split}_texts.jsonl`` in the output dir, the
ground truth the scoring reads. Writes into ``--output-dir`` (default ``D/eval/{split}``) the files of the
reference's manual steps — feature files, ``{split}_predictions.jsonl`` / ``{split}_tr_predictions.jsonl``
(submission-ready), ``{split}_texts.tr.jsonl``, ``output.json`` / ``output_tr.json`` (byte-identical to
``evaluation.py`` / ``evaluation_tr.py`` on those files) — plus ``summary.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cn_clip.cli.args import (
    add_context_length_arg,
    add_device_arg,
    add_image_reader_args,
    add_model_args,
    add_precision_arg,
    add_resume_arg,
    extract_options,
)
from cn_clip.cli.runner import run_cli, setup_logging
from cn_clip.data.sources import add_source_args
from cn_clip.errors import ConfigError, DataError
from cn_clip.eval import features as F
from cn_clip.eval.directions import IMAGE_TO_TEXT, TEXT_TO_IMAGE, Direction
from cn_clip.fileio import atomic_write
from cn_clip.runtime import barrier, resolve_device, shutdown
from cn_clip.tokenizer import get_tokenizer

_logger = logging.getLogger(__name__)

ARROWS = {"text_to_image": "text→image", "image_to_text": "image→text"}


def build_parser() -> argparse.ArgumentParser:
    from cn_clip.eval.topk import BACKENDS

    parser = argparse.ArgumentParser(description="Extract features, rank both directions and score them.")
    parser.add_argument(
        "--data",
        required=True,
        help="dataset dir with {split}_texts.jsonl and lmdb/{split}/imgs, or shards / a CSV/JSONL of image files",
    )
    parser.add_argument("--split", default="valid", help="split name (default valid)")
    parser.add_argument("--output-dir", default=None, help="default: DATA/eval/SPLIT")
    add_resume_arg(parser)
    add_model_args(parser)
    add_precision_arg(parser)
    add_context_length_arg(parser, interpolate=True)
    parser.add_argument("--img-batch-size", type=int, default=64, help="image batch size")
    parser.add_argument("--text-batch-size", type=int, default=64, help="text batch size")
    parser.add_argument("--top-k", type=int, default=10, help="predictions per query (the scoring needs 10)")
    add_device_arg(parser)
    parser.add_argument(
        "--backend", choices=BACKENDS, default="auto", help="top-k back end (see make_topk_predictions)"
    )
    parser.add_argument("--output-format", choices=("jsonl", "npy"), default="jsonl", help="feature file format")
    add_image_reader_args(parser)
    add_source_args(parser.add_argument_group("image sources (docs/data.md)"))
    parser.add_argument(
        "--calibrate",
        nargs="?",
        const="platt",
        default=None,
        choices=("platt", "isotonic", "temperature", "siglip"),
        help="also fit cosine → probability on this split: calib.json + plots in the output dir (default platt)",
    )
    return parser


@dataclass
class Layout:
    """Every input and output path of one run. ``derived``: the texts file is written from the pairs of a
    shard or file-list ``images`` source (:func:`write_derived_texts`) rather than read from the dataset dir."""

    images: str
    texts: Path
    out: Path
    split: str
    feature_suffix: str = ".jsonl"
    derived: bool = False

    @property
    def image_features(self) -> Path:
        return self.out / f"{self.split}_imgs.img_feat{self.feature_suffix}"

    @property
    def text_features(self) -> Path:
        return self.out / f"{self.split}_texts.txt_feat{self.feature_suffix}"

    @property
    def tr_truth(self) -> Path:
        return self.out / f"{self.split}_texts.tr.jsonl"

    def predictions(self, direction: Direction) -> Path:
        middle = "_tr" if direction is IMAGE_TO_TEXT else ""
        return self.out / f"{self.split}{middle}_predictions.jsonl"

    def score(self, direction: Direction) -> Path:
        return self.out / ("output_tr.json" if direction is IMAGE_TO_TEXT else "output.json")


def _reference_layout(args: argparse.Namespace) -> bool:
    """True when ``--data`` is a dataset dir in the reference layout (LMDB), False for shards or a file list."""
    from cn_clip.data.loader import resolve_dataset_type

    data, kind = str(args.data), args.dataset_type
    if kind == "lmdb" or (kind == "auto" and Path(data).is_dir() and not Path(data, "imgs").is_dir()):
        return True
    kind = resolve_dataset_type(data, kind)
    if kind == "lmdb":
        raise ConfigError(
            f"--data {data} is one split's LMDB; give the dataset dir that holds {args.split}_texts.jsonl and "
            f"lmdb/{args.split}/ (with --split)"
        )
    return False


def resolve_layout(args: argparse.Namespace) -> Layout:
    suffix = ".npy" if args.output_format == "npy" else ".jsonl"
    if not _reference_layout(args):
        if not args.output_dir:
            raise ConfigError(f"--data {args.data} is shards or a file list: give --output-dir for the results")
        out = Path(args.output_dir)
        texts = out / f"{args.split}_texts.jsonl"
        return Layout(str(args.data), texts, out, args.split, suffix, derived=True)
    data = Path(args.data)
    texts, images = data / f"{args.split}_texts.jsonl", data / "lmdb" / args.split / "imgs"
    if not texts.is_file():
        raise DataError(f"The annotation datafile {texts} not exists!")
    if not images.is_dir():
        raise DataError(f"The image LMDB directory {images} not exists!")
    out = Path(args.output_dir) if args.output_dir else data / "eval" / args.split
    return Layout(images=str(images), texts=texts, out=out, split=args.split, feature_suffix=suffix)


def write_derived_texts(layout: Layout, source: dict[str, Any]) -> int:
    """The pairs of a shard or file-list source → ``layout.texts`` in the reference's texts format; returns the
    number of texts."""
    from cn_clip.data.sources import caption_records, texts_by_id

    rows = texts_by_id(caption_records(layout.images, **source), layout.images)
    with atomic_write(layout.texts) as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    _logger.info("%s: %d texts and their images written to %s", layout.images, len(rows), layout.texts)
    return len(rows)


def write_tr_truth(texts: Path, output: Path) -> dict[Any, list]:
    """The ``.tr.jsonl`` that ``transform_ir_annotation_to_tr`` writes, into ``output``; returns it as a dict."""
    from cn_clip.eval.transform_ir_annotation_to_tr import invert_annotations, read_annotation_pairs

    inverted = invert_annotations(read_annotation_pairs(texts))
    with atomic_write(output) as handle:
        for image_id, text_ids in inverted.items():
            handle.write(json.dumps({"image_id": image_id, "text_ids": text_ids}) + "\n")
    return inverted


def rank_and_score(
    queries: F.Extracted, gallery: F.Extracted, direction: Direction, truth_path: Path, layout: Layout, args: Any
) -> dict[str, Any]:
    """Top-k predictions file for ``direction``, its reference evaluation JSON, and recall@1/5/10 for the table."""
    from cn_clip.eval.evaluation import evaluate
    from cn_clip.eval.make_topk_predictions import write_predictions
    from cn_clip.eval.metrics import read_ground_truth, recall_at_k
    from cn_clip.eval.topk import topk_search

    device = resolve_device(args.device)
    top = topk_search(queries.matrix, gallery.matrix, args.top_k, backend=args.backend, device=device)
    predictions = layout.predictions(direction)
    write_predictions(predictions, direction, queries.ids, gallery.ids, top.indices.tolist())
    truth = read_ground_truth(truth_path, direction)
    if not any(truth.values()):
        return {"predictions": str(predictions), "scored": False}
    with contextlib.redirect_stdout(io.StringIO()) as console:  # its "Read standard from …" lines go to the log
        result = evaluate(truth_path, predictions, layout.score(direction), direction)
    _logger.debug("%s", console.getvalue().strip())
    position = {qid: i for i, qid in enumerate(queries.ids)}
    ranked = {qid: [gallery.ids[j] for j in top.indices[position[qid]]] for qid in truth if qid in position}
    if len(ranked) != len(truth):
        missing = [qid for qid in truth if qid not in position][:5]
        raise DataError(f"{direction.query_key}s of the ground truth have no features: {missing} …")
    recalls = {k: 100 * v for k, v in recall_at_k(ranked, truth).items()}
    recalls["mean_recall"] = sum(recalls.values()) / 3
    return {"predictions": str(predictions), "scored": True, "recall": recalls, "evaluation": result}


def format_table(results: dict[str, dict[str, Any]]) -> str:
    lines = [f"{'direction':<12}{'R@1':>8}{'R@5':>8}{'R@10':>8}{'mean':>8}"]
    for name, result in results.items():
        if not result["scored"]:
            lines.append(f"{ARROWS[name]:<12}{'no ground truth in this split':>32}")
            continue
        r = result["recall"]
        lines.append(f"{ARROWS[name]:<12}{r['r1']:>8.2f}{r['r5']:>8.2f}{r['r10']:>8.2f}{r['mean_recall']:>8.2f}")
    scored = [r["recall"]["mean_recall"] for r in results.values() if r["scored"]]
    if len(scored) == 2:
        lines.append(f"{'both':<12}{'':>24}{sum(scored) / 2:>8.2f}")
    return "\n".join(lines)


def evaluate_split(args: argparse.Namespace) -> dict[str, Any] | None:
    """The whole pipeline; returns the summary on rank 0 (None on other torchrun ranks)."""
    layout = resolve_layout(args)
    env = F.join_processes(args.device)
    device = str(env.device)
    architecture = f"{args.vision_model}@{args.text_model}"
    announce = print if env.is_primary else None
    model, meta = F.load_eval_model(
        architecture, args.resume, device, args.precision, announce, args.context_length, args.interpolate_positions
    )
    opts = extract_options(args, tokenizer=get_tokenizer(model.cfg))
    if layout.derived:
        if env.is_primary:
            write_derived_texts(layout, opts.source)
        barrier(env)
    resolution = model.cfg.vision.image_resolution
    text_encoder = F.TorchEncoder(model.encode_text, device, args.precision)
    image_encoder = F.TorchEncoder(model.encode_image, device, args.precision)
    texts = F.extract_texts(text_encoder, layout.texts, layout.text_features, opts, env)
    images = F.extract_images(image_encoder, layout.images, resolution, layout.image_features, opts, env)
    if texts is None or images is None:
        return None
    bias = None if model.logit_bias is None else float(model.logit_bias.detach())
    scale_and_bias = (float(model.logit_scale.detach().exp()), bias)
    del model
    write_tr_truth(layout.texts, layout.tr_truth)
    results = {
        "text_to_image": rank_and_score(texts, images, TEXT_TO_IMAGE, layout.texts, layout, args),
        "image_to_text": rank_and_score(images, texts, IMAGE_TO_TEXT, layout.tr_truth, layout, args),
    }
    summary = {
        "data": str(args.data),
        "split": args.split,
        "checkpoint": str(args.resume),
        "epoch": meta.get("epoch"),
        "step": meta.get("step"),
        "architecture": architecture,
        "num_texts": len(texts.ids),
        "num_images": len(images.ids),
        "top_k": args.top_k,
        "results": results,
    }
    if args.calibrate:
        summary["calibration"] = _calibrate(args, layout, texts, images, *scale_and_bias)
    with atomic_write(layout.out / "summary.json") as handle:
        json.dump(summary, handle, ensure_ascii=False, indent=1)
    summary["table"] = format_table(results)
    return summary


def _calibrate(args: Any, layout: Layout, texts: Any, images: Any, scale: float, bias: float | None) -> dict:
    """``--calibrate``: fit on this split's features; calib.json (and the plots) go next to the predictions."""
    from cn_clip.eval.calibrate import FitOptions, calibrate_features, format_report, ground_truth_rows

    options = FitOptions(args.calibrate, logit_scale=scale, logit_bias=bias, target_precision=0.9)
    result = calibrate_features(
        texts.ids, texts.matrix, images.ids, images.matrix, ground_truth_rows(layout.texts), options,
        checkpoint=args.resume, output_dir=layout.out, source=str(layout.texts),
    )  # fmt: skip
    _logger.info("calibration (%s):\n%s", args.calibrate, format_report(result.calibrator.report, args.calibrate))
    return {"file": str(layout.out / "calib.json"), **result.calibrator.report}


def run(args: argparse.Namespace) -> int:
    for name in ("img_batch_size", "text_batch_size", "context_length", "top_k"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    from cn_clip.eval.topk import resolve_backend

    try:
        resolve_backend(args.backend, resolve_device(args.device))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    summary = evaluate_split(args)
    if summary is None:
        return 0
    print(f"{args.split}: {summary['num_texts']} texts, {summary['num_images']} images, checkpoint {args.resume}")
    print(summary["table"])
    for name, result in summary["results"].items():
        evaluation = result.get("evaluation")
        if evaluation is not None and not evaluation["success"]:
            print(f"{ARROWS[name]} submission check failed: {evaluation['errorMsg']}")
    print(f"Files written to {resolve_layout(args).out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    setup_logging()
    code = run_cli(lambda a: run(build_parser().parse_args(a)), argv)
    shutdown()
    return code


if __name__ == "__main__":
    raise SystemExit(main())
