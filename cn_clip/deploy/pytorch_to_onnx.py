"""Export the text and/or image encoder to ONNX; the reference's CLI, with dynamic axes and a parity check.

    python -m cn_clip.deploy.pytorch_to_onnx --model-arch ViT-B-16 --pytorch-ckpt-path clip_cn_vit-b-16.pt \\
        --save-onnx-path deploy/vit-b-16 --convert-text --convert-vision [--int8]

writes ``deploy/vit-b-16.{txt,img}.{fp32,fp16}[.int8].onnx``. Each file is checked in onnxruntime against the
PyTorch model before it is moved into place; a file that misses its threshold is not written (exit code 2).
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from cn_clip.cli.args import add_context_length_arg, add_export_args
from cn_clip.cli.runner import run_cli, setup_logging
from cn_clip.errors import ConfigError

_logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_export_args(parser)
    parser.add_argument(
        "--pytorch-ckpt-path", default=None, help="checkpoint to convert (default: download the released weights)"
    )
    parser.add_argument(
        "--download-root", default=None, help="where released weights are downloaded (default ./cache/clip)"
    )
    parser.add_argument("--save-onnx-path", required=True, help="output prefix: {prefix}.{txt,img}.{fp32,fp16}.onnx")
    add_context_length_arg(parser, interpolate=True)
    parser.add_argument("--int8", action="store_true", help="also write {prefix}.*.int8.onnx (dynamic quantisation)")
    parser.add_argument("--no-fp16", action="store_true", help="skip the fp16 variants")
    parser.add_argument(
        "--external-data",
        choices=("auto", "always"),
        default="auto",
        help="weights in one '<file>.extra_file' beside each model: when over 2 GB (auto) or always",
    )
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset (>= 17 keeps LayerNorm one op)")
    parser.add_argument("--skip-parity-check", action="store_true", help="write without comparing to PyTorch")
    return parser


def load_model(arch: str, checkpoint: str | None, download_root: str | None):  # noqa: ANN201 - CLIP
    """The fp32 model to export: from ``checkpoint``, or the released weights of ``arch``."""
    from cn_clip.models.factory import create_model, load_from_name
    from cn_clip.models.pretrained import PRETRAINED

    if checkpoint:
        if not Path(checkpoint).is_file():
            raise ConfigError(f"--pytorch-ckpt-path {checkpoint} does not exist")
        return create_model(arch, checkpoint=checkpoint)
    if arch not in PRETRAINED:
        raise ConfigError(f"--model-arch {arch} has no released weights; pass --pytorch-ckpt-path")
    model, _ = load_from_name(arch, device="cpu", download_root=download_root or os.path.expanduser("./cache/clip"))
    return model.float().eval()


def convert(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not (args.convert_text or args.convert_vision):
        raise ConfigError("nothing to convert: pass --convert-text and/or --convert-vision")
    from cn_clip.deploy.onnx_export import export_encoder

    model = load_model(args.model_arch, args.pytorch_ckpt_path, args.download_root)
    from cn_clip.models.positions import check_context_length

    check_context_length(model, args.context_length, args.interpolate_positions)
    precisions = ["fp32"] + ([] if args.no_fp16 else ["fp16"]) + (["int8"] if args.int8 else [])
    external = True if args.external_data == "always" else None
    written: dict[str, dict[str, Path]] = {}
    for kind, wanted in (("txt", args.convert_text), ("img", args.convert_vision)):
        if not wanted:
            continue
        result = export_encoder(
            model,
            kind,
            args.save_onnx_path,
            precisions=precisions,
            context_length=args.context_length,
            external_data=external,
            check=not args.skip_parity_check,
            opset=args.opset,
        )
        for report in result.reports:
            print(report)
        written[kind] = result.paths
    print("Finished PyTorch to ONNX conversion...")
    for kind, paths in written.items():
        label = "text" if kind == "txt" else "vision"
        for precision, path in paths.items():
            extra = path.parent / f"{path.name}.extra_file"
            suffix = f" with extra file {extra}" if extra.exists() else ""
            print(f">>> The {label} {precision.upper()} ONNX model is saved at {path}{suffix}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: user errors (bad flags, missing files, failed parity) print one line and return 2."""
    setup_logging()
    return run_cli(convert, argv)


if __name__ == "__main__":
    raise SystemExit(main())
