"""Build TensorRT engines from the ONNX encoders; the reference's CLI on the TensorRT 10 API, dynamic batch.

    python -m cn_clip.deploy.onnx_to_tensorrt --model-arch ViT-B-16 --convert-text --text-onnx-path m.txt.fp16.onnx \\
        --convert-vision --vision-onnx-path m.img.fp16.onnx --save-tensorrt-path deploy/vit-b-16 --fp16 --batch-size 16

writes ``{prefix}.{txt,img}.{fp16,fp32}.trt`` with an optimisation profile for batch 1..``--batch-size`` (and text
length 1..``--context-length``). Needs an NVIDIA GPU and ``pip install tensorrt``; without them it exits with a
clear message. Not exercised by the test suite (no GPU there); see docs/deploy.md.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cn_clip.cli.args import add_context_length_arg, add_export_args
from cn_clip.cli.runner import run_cli, setup_logging
from cn_clip.errors import ConfigError

_logger = logging.getLogger(__name__)


def import_tensorrt() -> Any:
    try:
        import tensorrt
    except ImportError:
        raise ConfigError(
            "TensorRT is not installed: `pip install tensorrt` on a machine with an NVIDIA GPU and CUDA "
            "(ONNX Runtime's CUDA provider needs no TensorRT: pip install onnxruntime-gpu)"
        ) from None
    return tensorrt


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_export_args(parser)
    parser.add_argument("--text-onnx-path", default=None, help="text ONNX model")
    parser.add_argument("--vision-onnx-path", default=None, help="image ONNX model")
    parser.add_argument("--batch-size", default=1, type=int, help="largest batch of the optimisation profile")
    add_context_length_arg(parser)
    parser.add_argument("--save-tensorrt-path", required=True, help="output prefix")
    parser.add_argument("--fp16", action="store_true", help="build an fp16 engine")
    parser.add_argument("--fp32", action="store_true", help="build an fp32 engine")
    parser.add_argument(
        "--fp16-banned-ops",
        default="NORMALIZATION,SOFTMAX",
        help="TensorRT layer types kept in fp32 in fp16 engines (comma-separated trt.LayerType names)",
    )
    parser.add_argument("--workspace-gb", type=float, default=4.0, help="builder workspace (device memory)")
    return parser


def build_engine(
    onnx_file: str, shapes: dict[str, tuple[tuple[int, ...], ...]], fp16: bool, banned: list[str], workspace_gb: float
) -> bytes:
    """Serialised engine for ``onnx_file``; ``shapes[input] = (min, opt, max)``."""
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(onnx_file):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ConfigError(f"TensorRT cannot parse {onnx_file}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        kept = {getattr(trt.LayerType, name.strip()) for name in banned if name.strip()}
        for index in range(network.num_layers):
            layer = network.get_layer(index)
            if layer.type in kept:
                layer.precision = trt.float32
    profile = builder.create_optimization_profile()
    for name, (low, opt, high) in shapes.items():
        profile.set_shape(name, low, opt, high)
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ConfigError(f"TensorRT failed to build an engine from {onnx_file} (see its log above)")
    return bytes(serialized)


class TensorRTEncoder:
    """Run a one-input, one-output engine on CUDA tensors (TensorRT 10 tensor-address API)."""

    def __init__(self, path: str) -> None:
        trt = import_tensorrt()
        if not Path(path).is_file():
            raise ConfigError(f"TensorRT engine {path} does not exist")
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = runtime.deserialize_cuda_engine(Path(path).read_bytes())
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        self.output = next(n for n in names if n != self.input)

    def __call__(self, inputs: Any) -> Any:
        import torch

        inputs = inputs.contiguous()
        self.context.set_input_shape(self.input, tuple(inputs.shape))
        out = torch.empty(tuple(self.context.get_tensor_shape(self.output)), device=inputs.device)
        self.context.set_tensor_address(self.input, inputs.data_ptr())
        self.context.set_tensor_address(self.output, out.data_ptr())
        self.context.execute_async_v3(torch.cuda.current_stream().cuda_stream)
        return out


def convert(argv: Sequence[str] | None = None) -> int:
    from cn_clip.fileio import atomic_write
    from cn_clip.models.factory import resolve_config

    args = build_parser().parse_args(argv)
    precisions = [p for p, wanted in (("fp16", args.fp16), ("fp32", args.fp32)) if wanted] or ["fp16"]
    resolution = resolve_config(args.model_arch).vision.image_resolution
    jobs = []
    if args.convert_text:
        shapes = {"text": ((1, 1), (args.batch_size, args.context_length), (args.batch_size, args.context_length))}
        jobs.append(("txt", "--text-onnx-path", args.text_onnx_path, shapes))
    if args.convert_vision:
        image = (3, resolution, resolution)
        shapes = {"image": ((1, *image), (args.batch_size, *image), (args.batch_size, *image))}
        jobs.append(("img", "--vision-onnx-path", args.vision_onnx_path, shapes))
    if not jobs:
        raise ConfigError("nothing to convert: pass --convert-text and/or --convert-vision")
    for kind, flag, path, shapes in jobs:
        if not path or not Path(path).is_file():
            raise ConfigError(f"Error: The specified {flag} {path} not exists!")
        for precision in precisions:
            engine = build_engine(path, shapes, precision == "fp16", args.fp16_banned_ops.split(","), args.workspace_gb)
            target = f"{args.save_tensorrt_path}.{kind}.{precision}.trt"
            with atomic_write(target, "wb") as handle:
                handle.write(engine)
            print(f">>> The {kind} TensorRT {precision.upper()} engine is saved at {target}")
    print("Finished ONNX to TensorRT conversion...")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    setup_logging()
    return run_cli(convert, argv)


if __name__ == "__main__":
    raise SystemExit(main())
