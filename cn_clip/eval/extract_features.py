"""Image and text features for retrieval evaluation; the reference's ``extract_features.py`` CLI and output files.

``python -m cn_clip.eval.extract_features --extract-image-feats --extract-text-feats --image-data LMDB/imgs
--text-data valid_texts.jsonl --resume CKPT --vision-model ViT-B-16 --text-model RoBERTa-wwm-ext-base-chinese``.
Runs on CPU or GPU; under ``torchrun --nproc_per_node N`` every process extracts a share and rank 0 writes the files.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from cn_clip.cli.args import (
    add_context_length_arg,
    add_debug_arg,
    add_device_arg,
    add_image_reader_args,
    add_model_args,
    add_precision_arg,
    add_resume_arg,
)
from cn_clip.cli.runner import run_cli, setup_logging
from cn_clip.data.sources import add_source_args, image_dataset, source_options
from cn_clip.errors import ConfigError
from cn_clip.eval import features as F

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
    add_context_length_arg(parser)
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
    return parser


def default_output_paths(text_data: str, output_format: str = "jsonl") -> tuple[str, str]:
    """(image, text) output paths derived, as the reference does, from the TEXT data path."""
    base = text_data.removesuffix(".jsonl")
    image = text_data.replace("_texts.jsonl", "_imgs")
    suffix = ".npy" if output_format == "npy" else ".jsonl"
    return f"{image}.img_feat{suffix}", f"{base}.txt_feat{suffix}"


@dataclass
class ExtractOptions:
    img_batch_size: int = 64
    text_batch_size: int = 64
    context_length: int = 52
    num_workers: int = 0
    npy_dtype: str = "float32"
    image_id_type: str = "auto"
    progress: bool = True
    source: dict = field(default_factory=dict)  # --dataset-type and file-list columns (data/sources.py)


def extract_images(
    model: Any, image_data: str, output: str | None, opts: ExtractOptions, device: str, precision: str, shard: F.Shard
) -> F.Extracted | None:
    """Image features of an imgs LMDB in key order; written to ``output`` (if given) by rank 0 and returned there."""
    resolution = model.cfg.vision.image_resolution
    dataset = image_dataset(image_data, resolution=resolution, id_type=opts.image_id_type, **opts.source)
    batches = F.shard(F.sequential_batches(len(dataset), opts.img_batch_size), shard.rank, shard.world_size)
    loader = F.make_loader(dataset, batches, opts.num_workers, pin_memory=device.startswith("cuda"))
    encoder = F.TorchEncoder(model.encode_image, device, precision)
    part = F.extract_features(encoder, loader, desc="images", progress=opts.progress and shard.is_primary)
    return _finish(part, output, "image_id", opts, shard)


def extract_texts(
    model: Any, text_data: str, output: str | None, opts: ExtractOptions, device: str, precision: str, shard: F.Shard
) -> F.Extracted | None:
    """Text features of a texts JSONL, batched by length, returned and written in file order."""
    from cn_clip.data.lmdb_dataset import JsonlTextDataset

    dataset = JsonlTextDataset(text_data, context_length=opts.context_length)
    lengths = [len(text) for _, text in dataset.records]  # characters ≈ word pieces for Chinese text
    batches = F.shard(F.length_grouped_batches(lengths, opts.text_batch_size), shard.rank, shard.world_size)
    loader = F.make_loader(dataset, batches, opts.num_workers, pin_memory=device.startswith("cuda"))
    encoder = F.TorchEncoder(model.encode_text, device, precision)
    part = F.extract_features(encoder, loader, desc="texts", progress=opts.progress and shard.is_primary)
    return _finish(part, output, "text_id", opts, shard)


def _finish(
    part: F.Extracted, output: str | None, id_key: str, opts: ExtractOptions, shard: F.Shard
) -> F.Extracted | None:
    merged = F.gather_to_primary(part, output or f"./{id_key}_features", shard)
    if merged is not None and output:
        F.write_features(output, merged, id_key, opts.npy_dtype)
    return merged


def _check_args(args: argparse.Namespace) -> None:
    if not (args.extract_image_feats or args.extract_text_feats):
        raise ConfigError("--extract-image-feats and --extract-text-feats cannot both be False!")
    for name in ("img_batch_size", "text_batch_size", "context_length"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    image_default, text_default = default_output_paths(args.text_data, args.output_format)
    args.image_feat_output_path = args.image_feat_output_path or image_default
    args.text_feat_output_path = args.text_feat_output_path or text_default
    if args.output_format == "npy":
        for path in (args.image_feat_output_path, args.text_feat_output_path):
            if not path.endswith(".npy"):
                raise ConfigError(f"--output-format npy needs output paths ending in .npy, got {path}")


def run(args: argparse.Namespace) -> int:
    _check_args(args)
    shard = F.shard_from_env()
    if shard.is_primary:
        F.print_params(args)
    device = F.resolve_device(args.device)
    if shard.is_primary:  # the reference's console order: datasets announced before the checkpoint is read
        if args.extract_image_feats:
            print("Preparing image inference dataset.")
        if args.extract_text_feats:
            print("Preparing text inference dataset.")
    model, _ = F.load_eval_model(
        f"{args.vision_model}@{args.text_model}", args.resume, device, args.precision, announce=shard.is_primary
    )
    opts = ExtractOptions(
        img_batch_size=args.img_batch_size,
        text_batch_size=args.text_batch_size,
        context_length=args.context_length,
        num_workers=args.num_workers,
        npy_dtype=args.npy_dtype,
        image_id_type=args.image_id_type,
        progress=not args.no_progress,
        source=source_options(args),
    )
    if args.extract_text_feats:
        if shard.is_primary:
            print("Make inference for texts...")
        done = extract_texts(model, args.text_data, args.text_feat_output_path, opts, device, args.precision, shard)
        if done is not None:
            print(f"{len(done.ids)} text features are stored in {args.text_feat_output_path}")
    if args.extract_image_feats:
        if shard.is_primary:
            print("Make inference for images...")
        done = extract_images(model, args.image_data, args.image_feat_output_path, opts, device, args.precision, shard)
        if done is not None:
            print(f"{len(done.ids)} image features are stored in {args.image_feat_output_path}")
    if shard.is_primary:
        print("Done!")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    def entry(args_list: Sequence[str] | None) -> int:
        args = build_parser().parse_args(args_list)
        setup_logging(logging.DEBUG if args.debug else logging.INFO)
        return run(args)

    setup_logging()
    code = run_cli(entry, argv)
    F.finish_distributed()
    return code


if __name__ == "__main__":
    raise SystemExit(main())
