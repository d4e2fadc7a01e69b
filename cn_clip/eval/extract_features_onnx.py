"""Image and text features from exported ONNX encoders; the reference's ``extract_features_onnx.py`` CLI.

``python -m cn_clip.eval.extract_features_onnx --extract-image-feats --extract-text-feats --image-data LMDB/imgs
--text-data valid_texts.jsonl --onnx-image-model m.img.fp16.onnx --onnx-text-model m.txt.fp16.onnx --device cpu``.
Output files are the PyTorch extractor's (L2-normalised ``{"image_id"|"text_id", "feature"}`` lines). Any batch size
works with cn_clip's dynamic-axis exports; the reference's fixed batch-1 graphs are run item by item.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

from cn_clip.cli.args import (
    add_context_length_arg,
    add_debug_arg,
    add_device_arg,
    add_image_reader_args,
    add_matryoshka_dim_arg,
    add_model_args,
    extract_options,
)
from cn_clip.cli.runner import print_params, run_cli, setup_logging
from cn_clip.errors import ConfigError
from cn_clip.eval.extract_features import add_feature_io_args, check_feature_io_args

_logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Extract L2-normalised features with ONNX Runtime.")
    add_feature_io_args(parser, default_batch_size=1)  # the reference's ONNX extractor defaults to batch 1
    add_context_length_arg(parser)
    parser.add_argument("--onnx-image-model", default=None, type=str, help="*.img.{fp32,fp16,int8}.onnx")
    parser.add_argument("--onnx-text-model", default=None, type=str, help="*.txt.{fp32,fp16,int8}.onnx")
    add_device_arg(parser, choices=("cuda", "cpu"))  # the onnxruntime provider
    add_model_args(parser)  # the image resolution (--vision-model) and the tokenizer (--text-model)
    add_debug_arg(parser)
    extra = parser.add_argument_group("cn_clip additions")
    add_image_reader_args(extra)
    add_matryoshka_dim_arg(extra)
    return parser


def _check_args(args: argparse.Namespace) -> None:
    check_feature_io_args(args)
    for wanted, flag, path in (
        (args.extract_image_feats, "--onnx-image-model", args.onnx_image_model),
        (args.extract_text_feats, "--onnx-text-model", args.onnx_text_model),
    ):
        if wanted and not path:
            raise ConfigError(f"{flag} is required for this extraction")
        if wanted and not Path(path).is_file():
            raise ConfigError(f"{flag} {path} does not exist")


def run(args: argparse.Namespace) -> int:
    from cn_clip.eval import features as F
    from cn_clip.models.matryoshka import check_dim
    from cn_clip.models.registry import get_model_config
    from cn_clip.runtime import resolve_device
    from cn_clip.tokenizer import get_tokenizer

    _check_args(args)
    args.device = args.device or resolve_device(per_rank=False)  # the provider: "cuda" when available
    print_params(args)
    image_default, text_default = F.default_output_paths(args.text_data)
    architecture = f"{args.vision_model}@{args.text_model}"
    opts = extract_options(args, tokenizer=get_tokenizer(architecture) if args.extract_text_feats else None)
    config = get_model_config(architecture)
    if args.dim is not None:
        check_dim(args.dim, config.embed_dim)

    def encoder(path: str) -> F.Encoder:
        onnx = F.OnnxEncoder(path, args.device)
        return onnx if args.dim is None else F.PrefixEncoder(onnx, args.dim)

    jobs = []
    if args.extract_text_feats:
        output = args.text_feat_output_path or text_default
        jobs.append(F.FeatureJob("text", encoder(args.onnx_text_model), args.text_data, output))
    if args.extract_image_feats:
        resolution = config.vision.image_resolution
        output = args.image_feat_output_path or image_default
        jobs.append(F.FeatureJob("image", encoder(args.onnx_image_model), args.image_data, output, resolution))
    F.extract_files(jobs, opts, announce=print)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    def entry(args_list: Sequence[str] | None) -> int:
        args = build_parser().parse_args(args_list)
        setup_logging(logging.DEBUG if args.debug else logging.INFO)
        return run(args)

    setup_logging()
    return run_cli(entry, argv)


if __name__ == "__main__":
    raise SystemExit(main())
