"""Zero-shot image classification; the reference ``zeroshot_evaluation.py`` CLI, data layout and ELEVATER JSON.

``python -m cn_clip.eval.zeroshot_evaluation --datapath D/test --label-file D/label_cn.txt --dataset cifar-100
--resume CKPT --save-dir OUT``. Prints ``zeroshot-top1: …`` as the reference, then true top-5 and mean-per-class
accuracy. ``--logit-scale 100`` (default, the reference's fixed scale) or ``model`` (the checkpoint's learnt scale);
``--templates`` picks another bundled set or a file.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

from cn_clip.cli.args import (
    add_context_length_arg,
    add_device_arg,
    add_matryoshka_dim_arg,
    add_model_args,
    add_num_workers_arg,
    add_precision_arg,
    add_progress_arg,
    add_resume_arg,
)
from cn_clip.cli.runner import print_params, run_cli, setup_logging
from cn_clip.errors import ConfigError
from cn_clip.eval import features as F
from cn_clip.eval import zeroshot as Z
from cn_clip.fileio import atomic_write
from cn_clip.models.matryoshka import check_dim
from cn_clip.runtime import resolve_device
from cn_clip.tokenizer import get_tokenizer

_logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Zero-shot classification of an image folder (ELEVATER JSON).")
    add_model_args(parser)
    add_precision_arg(parser)
    parser.add_argument("--label-file", type=str, default=None, help="class names, one per line (label_cn.txt)")
    parser.add_argument("--datapath", type=str, required=True, help="image folder root: <class-id>/<images>")
    parser.add_argument("--dataset", type=str, default="imagenet", help="dataset name: output file, template set")
    parser.add_argument("--index", type=str, default="", help="ELEVATER index.json reordering the predictions")
    parser.add_argument("--save-dir", type=str, default="", help="directory for {dataset}.json")
    parser.add_argument("--img-batch-size", type=int, default=64, help="image batch size")
    add_context_length_arg(parser, interpolate=True)
    add_resume_arg(parser)
    add_num_workers_arg(parser)
    extra = parser.add_argument_group("cn_clip additions")
    extra.add_argument(
        "--templates",
        default=None,
        help="bundled set name (openai, food, flower, aircraft, eurosat, country211, cifar100, imagenet, …) or a "
        "file (.json list, or one template per line with {c} for the class name); default: by --dataset",
    )
    extra.add_argument(
        "--logit-scale", choices=("100", "model"), default="100", help="100 = the reference; model = exp(logit_scale)"
    )
    extra.add_argument("--text-batch-size", type=int, default=512, help="texts per batch for the classifier")
    add_device_arg(extra)
    add_progress_arg(extra)
    add_matryoshka_dim_arg(extra)
    return parser


def _label_file(args: argparse.Namespace) -> str:
    if args.label_file:
        return args.label_file
    guess = Path(args.datapath).parent / "label_cn.txt"
    if guess.is_file():
        _logger.info("--label-file not given; using %s", guess)
        return str(guess)
    raise ConfigError(f"--label-file is required (no label_cn.txt beside {args.datapath})")


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """Classifier → predictions → metrics and the JSON file; returns ``{"metrics", "probs", "targets", "path"}``."""
    import numpy as np

    classnames = Z.read_classnames(_label_file(args))
    template_name, templates = Z.load_templates(args.templates, args.dataset)
    _logger.info("%d classes, template set %s (%d templates)", len(classnames), template_name, len(templates))
    device = resolve_device(args.device)
    print("Preparing zeroshot dataset.")
    architecture = f"{args.vision_model}@{args.text_model}"
    model, _ = F.load_eval_model(
        architecture, args.resume, device, args.precision, print, args.context_length, args.interpolate_positions
    )
    if args.dim is not None:
        check_dim(args.dim, model.cfg.embed_dim)
    folder = Z.open_image_folder(args.datapath, model.cfg.vision.image_resolution, len(classnames))
    print("Building zero-shot classifier")
    text_encoder = F.TorchEncoder(partial(model.encode_text, dim=args.dim), device, args.precision)
    progress = not args.no_progress
    classifier = Z.build_classifier(
        text_encoder,
        classnames,
        templates,
        args.context_length,
        args.text_batch_size,
        progress,
        tokenizer=get_tokenizer(model.cfg),
    )
    print("Using classifier")
    batches = F.sequential_batches(len(folder), args.img_batch_size)
    workers = args.num_workers
    encoder = F.TorchEncoder(partial(model.encode_image, dim=args.dim), device, args.precision)
    images = F.extract_dataset(
        encoder, Z.TargetFirst(folder), batches, num_workers=workers, desc="images", progress=progress
    )
    scale = float(model.logit_scale.detach().exp()) if args.logit_scale == "model" else Z.REFERENCE_LOGIT_SCALE
    probs, targets = Z.class_probabilities(images.matrix, classifier, scale), np.asarray(images.ids)
    metrics = Z.zeroshot_metrics(probs, targets)  # before --index, as the reference counts top-1
    if args.index:
        order = Z.read_index(args.index, len(probs))
        probs, targets = probs[order], targets[order]
    path = Path(args.save_dir or ".") / f"{args.dataset}.json"
    with atomic_write(path) as handle:
        handle.write(Z.elevater_json(args.vision_model, args.dataset, Z.param_counts(model), probs))
    _logger.info("wrote %s ([1, %d, %d] predictions, logit scale %.4g)", path, *probs.shape, scale)
    return {"metrics": metrics, "probs": probs, "targets": targets, "path": path}


def run(args: argparse.Namespace) -> int:
    for name in ("img_batch_size", "text_batch_size", "context_length"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    print_params(args)
    metrics = evaluate(args)["metrics"]
    print("Result:")
    print(f"zeroshot-top1: {metrics['top1']}")
    print(f"zeroshot-top5: {metrics['top5']}")
    print(f"zeroshot-mean-per-class: {metrics['mean_per_class']}")
    print("Finished.")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    setup_logging()
    return run_cli(lambda a: run(build_parser().parse_args(a)), argv)


if __name__ == "__main__":
    raise SystemExit(main())
