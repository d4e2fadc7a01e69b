"""Inference latency of PyTorch, ONNX Runtime (and TensorRT) encoders; the reference's CLI, measured correctly.

    python -m cn_clip.deploy.speed_benchmark --model-arch ViT-B-16 --pytorch-ckpt clip_cn_vit-b-16.pt \\
        --pytorch-precision fp32 bf16 --onnx-image-model m.img.fp32.onnx m.img.int8.onnx --device cpu \\
        --batch-size 1 16 --n 20 --warmup 3

Prints the reference's ``[name] mean=…ms, sd=…ms, min=…ms, max=…ms, median=…ms, 95p=…ms, 99p=…ms`` lines, with
preprocessing (resize + normalise, tokenisation) timed separately, then a summary table with items/s.
Every call runs under ``torch.inference_mode`` with the device synchronised; warm-up calls are not timed.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cn_clip.cli.args import add_context_length_arg, add_device_arg, add_model_arch_arg
from cn_clip.cli.runner import run_cli, setup_logging
from cn_clip.deploy.benchmark import TimingStats, markdown_table, time_calls
from cn_clip.errors import ConfigError

_logger = logging.getLogger(__name__)
REFERENCE_IMAGE = "examples/pokemon.jpeg"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_arch_arg(parser)
    parser.add_argument("--pytorch-ckpt", default=None, help="checkpoint; without it PyTorch is not run")
    parser.add_argument(
        "--pytorch-precision", nargs="+", choices=("fp16", "fp32", "bf16"), default=["fp16"], help="one or more"
    )
    parser.add_argument("--onnx-image-model", nargs="+", default=[], help="one or more image ONNX files")
    parser.add_argument("--onnx-text-model", nargs="+", default=[], help="one or more text ONNX files")
    parser.add_argument("--tensorrt-image-model", default=None, help="TensorRT image engine (cuda only)")
    parser.add_argument("--tensorrt-text-model", default=None, help="TensorRT text engine (cuda only)")
    parser.add_argument("--batch-size", nargs="+", type=int, default=[1], help="one or more batch sizes")
    parser.add_argument("--n", default=100, type=int, help="timed calls per measurement")
    parser.add_argument("--warmup", default=10, type=int, help="untimed warm-up calls")
    add_device_arg(parser, choices=("cuda", "cpu"))
    add_context_length_arg(parser)
    extra = parser.add_argument_group("cn_clip additions")
    extra.add_argument("--image", default=None, help=f"input image (default {REFERENCE_IMAGE}, else a sample photo)")
    extra.add_argument("--text", default="杰尼龟", help="input text, repeated batch-size times")
    extra.add_argument("--threads", type=int, default=None, help="CPU threads for PyTorch and onnxruntime")
    extra.add_argument("--compile", action="store_true", help="also time torch.compile'd PyTorch encoders")
    extra.add_argument("--skip-image", action="store_true", help="only time the text encoders")
    extra.add_argument("--skip-text", action="store_true", help="only time the image encoders")
    return parser


def load_image(path: str | None) -> Any:
    """``--image``, else the reference's ``examples/pokemon.jpeg`` if present, else a real sample photo."""
    from PIL import Image

    from cn_clip.deploy.onnx_export import real_image

    if path or Path(REFERENCE_IMAGE).is_file():
        path = path or REFERENCE_IMAGE
        if not Path(path).is_file():
            raise ConfigError(f"--image {path} does not exist")
        return Image.open(path)
    _logger.info("%s not found; using a sample photo (--image to choose one)", REFERENCE_IMAGE)
    return real_image()


class Runner:
    """Collects :class:`TimingStats` and prints each line as the reference does."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rows: list[TimingStats] = []
        self.models: list[tuple[str, Any]] = []

    def measure(self, name: str, fn: Callable[[], object], items: int) -> None:
        seconds = time_calls(fn, self.args.n, self.args.warmup, self.args.device)
        stats = TimingStats.of(name, seconds, items)
        print(stats.line(), flush=True)
        self.rows.append(stats)


def _pytorch_models(args: argparse.Namespace) -> list[tuple[str, Any]]:
    import torch

    from cn_clip.models.factory import convert_weights, create_model

    models = []
    for precision in args.pytorch_precision:
        model = create_model(args.model_arch, checkpoint=args.pytorch_ckpt, device=args.device)
        if precision != "fp32":
            if args.device == "cpu" and precision == "fp16":
                _logger.warning("fp16 on the CPU runs slow fallback kernels; bf16 or fp32 are the CPU choices")
            convert_weights(model, torch.float16 if precision == "fp16" else torch.bfloat16)
        label = "Pytorch" if len(args.pytorch_precision) == 1 else f"Pytorch {precision}"
        models.append((label, model.eval()))
        if args.compile:
            models.append((f"{label} compiled", _compiled(model)))
    return models


def _compiled(model: Any) -> Any:
    import torch

    class Compiled:
        encode_image = staticmethod(torch.compile(model.encode_image, dynamic=False))
        encode_text = staticmethod(torch.compile(model.encode_text, dynamic=True))

    return Compiled()


def _onnx_label(engine: str, path: str, count: int) -> str:
    return engine if count == 1 else f"{engine} {Path(path).name}"


def bench_images(runner: Runner, image: Any, batch: int) -> None:
    import torch

    from cn_clip.models.factory import resolve_config
    from cn_clip.transforms import image_transform

    args = runner.args
    preprocess = image_transform(resolve_config(args.model_arch).vision.image_resolution)
    runner.measure(
        f"Image preprocessing (batch-size: {batch}):", lambda: torch.stack([preprocess(image)] * batch), batch
    )
    pixels = torch.stack([preprocess(image)] * batch)
    _bench_encoders(runner, "image", pixels, args.onnx_image_model, args.tensorrt_image_model, batch)


def bench_texts(runner: Runner, batch: int) -> None:
    from cn_clip.tokenizer import tokenize

    args = runner.args
    texts = [args.text] * batch
    runner.measure(
        f"Text tokenization (batch-size: {batch}):", lambda: tokenize(texts, context_length=args.context_length), batch
    )
    tokens = tokenize(texts, context_length=args.context_length)
    _bench_encoders(runner, "text", tokens, args.onnx_text_model, args.tensorrt_text_model, batch)


def _bench_encoders(
    runner: Runner, kind: str, inputs: Any, onnx_paths: list[str], tensorrt_path: str | None, batch: int
) -> None:
    """Time every back end on the same ``inputs`` (pixels or token ids): PyTorch models, ONNX files, TensorRT."""
    import torch

    from cn_clip.eval.features import OnnxEncoder

    args = runner.args
    if args.pytorch_ckpt:
        on_device = inputs.to(args.device)
        for label, model in runner.models:
            encode = getattr(model, f"encode_{kind}")
            with torch.inference_mode():
                runner.measure(
                    f"{label} {kind} inference speed (batch-size: {batch}):", lambda e=encode: e(on_device), batch
                )
    for path in onnx_paths:
        encoder = OnnxEncoder(path, args.device, args.threads)
        array = encoder.prepare(inputs)  # padding columns dropped (dynamic graphs) or fitted to a fixed context
        label = _onnx_label("ONNX", path, len(onnx_paths))
        runner.measure(
            f"{label} {kind} inference speed (batch-size: {batch}):", lambda e=encoder, a=array: e.run(a), batch
        )
    if tensorrt_path:
        _tensorrt(runner, tensorrt_path, kind, inputs, batch)


def _tensorrt(runner: Runner, path: str, kind: str, inputs: Any, batch: int) -> None:
    if runner.args.device != "cuda":
        _logger.warning("TensorRT engines run on CUDA only; skipping %s", path)
        return
    from cn_clip.deploy.onnx_to_tensorrt import TensorRTEncoder

    engine = TensorRTEncoder(path)
    on_device = inputs.cuda()
    runner.measure(f"TensorRT {kind} inference speed (batch-size: {batch}):", lambda: engine(on_device), batch)


def _check(args: argparse.Namespace) -> None:
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available (pass --device cpu)")
    if args.pytorch_ckpt and not Path(args.pytorch_ckpt).is_file():
        raise ConfigError(f"--pytorch-ckpt {args.pytorch_ckpt} does not exist")
    if args.n < 1 or args.warmup < 0 or min(args.batch_size) < 1:
        raise ConfigError("--n and --batch-size must be >= 1 and --warmup >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)


def benchmark(argv: Sequence[str] | None = None) -> int:
    from cn_clip.runtime import resolve_device

    args = build_parser().parse_args(argv)
    args.device = args.device or resolve_device(per_rank=False)  # "cuda" when available, as in the reference
    _check(args)
    print("Params:")
    for name in sorted(vars(args)):
        print(f"  {name}: {getattr(args, name)}")
    runner = Runner(args)
    runner.models = _pytorch_models(args) if args.pytorch_ckpt else []
    if not args.skip_image:
        print("Begin the image feature extraction speed test...")
        image = load_image(args.image)
        for batch in args.batch_size:
            bench_images(runner, image, batch)
    if not args.skip_text:
        print("Begin the text feature extraction speed test...")
        for batch in args.batch_size:
            bench_texts(runner, batch)
    print()
    print(markdown_table(runner.rows))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    setup_logging()
    return run_cli(benchmark, argv)


if __name__ == "__main__":
    raise SystemExit(main())
