"""Export the encoders to Core ML (``.mlpackage``); the reference's CLI. Needs ``pip install coremltools``.

    python -m cn_clip.deploy.pytorch_to_coreml --model-arch ViT-B-16 --pytorch-ckpt-path clip_cn_vit-b-16.pt \\
        --save-coreml-path deploy/vit-b-16 --convert-text --convert-vision --precision fp16

writes ``{prefix}.text.mlpackage`` (input ``text`` int32 [1, ctx], output ``text_features``) and
``{prefix}.image.mlpackage`` (input ``image`` [1, 3, R, R], output ``image_features``), mlprogram, iOS 15.
Features are unnormalised, as in the reference. Without coremltools it exits with a clear message; the conversion is
not exercised by the test suite (coremltools runs models only on macOS).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from cn_clip.cli.args import add_context_length_arg, add_export_args
from cn_clip.cli.runner import run_cli, setup_logging
from cn_clip.errors import ConfigError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_export_args(parser)
    parser.add_argument("--pytorch-ckpt-path", default=None, help="checkpoint (default: released weights)")
    parser.add_argument("--download-root", default=None, help="where released weights are downloaded")
    parser.add_argument("--save-coreml-path", required=True, help="output prefix")
    parser.add_argument("--precision", choices=("fp16", "fp32"), default="fp16", help="compute precision")
    add_context_length_arg(parser)
    return parser


def _coremltools() -> Any:
    try:
        import coremltools
    except ImportError:
        raise ConfigError(
            "coremltools is not installed: pip install coremltools (conversion runs on Linux too)"
        ) from None
    return coremltools


def convert(argv: Sequence[str] | None = None) -> int:
    import torch

    from cn_clip.deploy.onnx_export import ImageEncoder, TextEncoder
    from cn_clip.deploy.pytorch_to_onnx import load_model

    args = build_parser().parse_args(argv)
    if not (args.convert_text or args.convert_vision):
        raise ConfigError("nothing to convert: pass --convert-text and/or --convert-vision")
    ct = _coremltools()
    model = load_model(args.model_arch, args.pytorch_ckpt_path, args.download_root)
    precision = ct.precision.FLOAT16 if args.precision == "fp16" else ct.precision.FLOAT32
    jobs = []
    if args.convert_text:
        example = torch.ones(1, args.context_length, dtype=torch.long)
        jobs.append(("text", TextEncoder(model), example, ct.TensorType(name="text", shape=example.shape, dtype=int)))
    if args.convert_vision:
        res = model.cfg.vision.image_resolution
        example = torch.zeros(1, 3, res, res)
        jobs.append(("image", ImageEncoder(model), example, ct.TensorType(name="image", shape=example.shape)))
    for kind, wrapper, example, input_type in jobs:
        with torch.no_grad():
            traced = torch.jit.trace(wrapper.eval(), example)
        mlmodel = ct.convert(
            traced,
            inputs=[input_type],
            outputs=[ct.TensorType(name=f"{kind}_features")],
            convert_to="mlprogram",
            minimum_deployment_target=ct.target.iOS15,
            compute_precision=precision,
        )
        target = f"{args.save_coreml_path}.{kind}.mlpackage"
        mlmodel.save(target)
        print(f">>> The {kind} Core ML model is saved at {target}")
    print("Finished PyTorch to CoreML conversion...")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    setup_logging()
    return run_cli(convert, argv)


if __name__ == "__main__":
    raise SystemExit(main())
