"""Image and text features for retrieval evaluation; the reference's ``extract_features.py`` CLI and output files.

``python -m cn_clip.eval.extract_features --extract-image-feats --extract-text-feats --image-data LMDB/imgs
--text-data valid_texts.jsonl --resume CKPT --vision-model ViT-B-16 --text-model RoBERTa-wwm-ext-base-chinese``.
Runs on CPU or GPU; under ``torchrun --nproc_per_node N`` every process extracts a share and rank 0 writes the files.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from functools import partial

from cn_clip.cli.args import (
    add_context_length_arg,
    add_debug_arg,
    add_device_arg,
    add_image_reader_args,
    add_matryoshka_dim_arg,
    add_model_args,
    add_precision_arg,
    add_resume_arg,
    extract_options,
)
from cn_clip.cli.runner import print_params, run_cli, setup_logging
from cn_clip.data.sources import add_source_args
from cn_clip.errors import ConfigError
from cn_clip.eval import features as F
from cn_clip.eval.features import default_output_paths
from cn_clip.models.matryoshka import check_dim
from cn_clip.runtime import shutdown
from cn_clip.tokenizer import get_tokenizer

_logger = logging.getLogger(__name__)

REFERENCE_IMAGE_DATA = "../Multimodal_Retrieval/lmdb/test/imgs"
REFERENCE_TEXT_DATA = "../Multimodal_Retrieval/test_texts.jsonl"


def add_feature_io_args(parser: argparse.ArgumentParser, default_batch_size: int) -> None:
    """The reference's data and output flags, shared by the PyTorch and the ONNX extractor."""
    parser.add_argument("--extract-image-feats", action="store_true", default=False, help="extract image features")
    parser.add_argument("--extract-text-feats", action="store_true", default=False, help="extract text features")
    parser.add_argument("--image-data", type=str, default=REFERENCE_IMAGE_DATA, help="an imgs LMDB directory")
    parser.add_argument("--text-data", type=str, default=REFERENCE_TEXT_DATA, help="texts JSONL file")
    parser.add_argument(
        "--image-feat-output-path",
        type=str,
        default=None,
        help="default: the TEXT path with _texts.jsonl → _imgs, plus .img_feat.jsonl (reference rule)",
    )
    parser.add_argument(
        "--text-feat-output-path", type=str, default=None, help="default: text path minus .jsonl, plus .txt_feat.jsonl"
    )
    parser.add_argument("--img-batch-size", type=int, default=default_batch_size, help="image batch size")
    parser.add_argument("--text-batch-size", type=int, default=default_batch_size, help="text batch size")
    add_source_args(parser.add_argument_group("image sources (docs/data.md)"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Extract L2-normalised image and/or text features (JSONL or .npy).")
    add_feature_io_args(parser, default_batch_size=64)
    add_context_length_arg(parser, interpolate=True)
    add_resume_arg(parser)
    add_precision_arg(parser)
    add_model_args(parser)
    add_debug_arg(parser)
    extra = parser.add_argument_group("cn_clip additions")
    extra.add_argument(
        "--output-format", choices=("jsonl", "npy"), default="jsonl", help="npy: .npy matrix + .ids.json sidecar"
    )
    extra.add_argument("--npy-dtype", choices=("float32", "float16"), default="float32", help="matrix dtype for npy")
    add_device_arg(extra)
    add_image_reader_args(extra)
    add_matryoshka_dim_arg(extra)
    return parser


def check_feature_io_args(args: argparse.Namespace) -> None:
    """The checks of :func:`add_feature_io_args` flags (and ``--context-length``) both extractors share."""
    if not (args.extract_image_feats or args.extract_text_feats):
        raise ConfigError("--extract-image-feats and --extract-text-feats cannot both be False!")
    for name in ("img_batch_size", "text_batch_size", "context_length"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")


def _check_args(args: argparse.Namespace) -> None:
    check_feature_io_args(args)
    image_default, text_default = default_output_paths(args.text_data, args.output_format)
    args.image_feat_output_path = args.image_feat_output_path or image_default
    args.text_feat_output_path = args.text_feat_output_path or text_default
    if args.output_format == "npy":
        for path in (args.image_feat_output_path, args.text_feat_output_path):
            if not path.endswith(".npy"):
                raise ConfigError(f"--output-format npy needs output paths ending in .npy, got {path}")


def run(args: argparse.Namespace) -> int:
    _check_args(args)
    env = F.join_processes(args.device)
    primary = env.is_primary
    if primary:
        print_params(args)
        # the reference's console order: datasets announced before the checkpoint is read
        if args.extract_image_feats:
            print("Preparing image inference dataset.")
        if args.extract_text_feats:
            print("Preparing text inference dataset.")
    device = str(env.device)
    architecture = f"{args.vision_model}@{args.text_model}"
    model, _ = F.load_eval_model(
        architecture,
        args.resume,
        device,
        args.precision,
        print if primary else None,
        args.context_length,
        args.interpolate_positions,
    )
    if args.dim is not None:
        check_dim(args.dim, model.cfg.embed_dim)
    opts = extract_options(args, tokenizer=get_tokenizer(model.cfg))
    jobs = []
    if args.extract_text_feats:
        encoder = F.TorchEncoder(partial(model.encode_text, dim=args.dim), device, args.precision)
        jobs.append(F.FeatureJob("text", encoder, args.text_data, args.text_feat_output_path))
    if args.extract_image_feats:
        encoder = F.TorchEncoder(partial(model.encode_image, dim=args.dim), device, args.precision)
        resolution = model.cfg.vision.image_resolution
        jobs.append(F.FeatureJob("image", encoder, args.image_data, args.image_feat_output_path, resolution))
    F.extract_files(jobs, opts, env, print if primary else None)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    def entry(args_list: Sequence[str] | None) -> int:
        args = build_parser().parse_args(args_list)
        setup_logging(logging.DEBUG if args.debug else logging.INFO)
        return run(args)

    setup_logging()
    code = run_cli(entry, argv)
    shutdown()
    return code


if __name__ == "__main__":
    raise SystemExit(main())
