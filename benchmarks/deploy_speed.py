"""Deployment speed on this machine: PyTorch fp32 vs ONNX Runtime fp32 vs int8 for ViT-B-16 and RN50.

Builds a checkpoint of deterministic fixture weights (the released files cannot be downloaded here), exports it with
``cn_clip.deploy.pytorch_to_onnx`` (which checks parity and prints it), then times every back end with
``cn_clip.deploy.speed_benchmark`` (warm-up, inference_mode, preprocessing timed apart). Output: the exporter's
parity lines and the benchmark's table, as printed.

    .venv/bin/python benchmarks/deploy_speed.py [--archs ViT-B-16 RN50] [--n 10] [--threads 2]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "fixtures"))
from fixture_weights import KEYS_DIR, read_key_shapes, reference_checkpoint  # noqa: E402

ARCHS = {"ViT-B-16": "ViT-B-16@RoBERTa-wwm-ext-base-chinese", "RN50": "RN50@RBT3-chinese"}


def run(args: list[str]) -> None:
    """Run a cn_clip CLI; its log (the exporter's parity lines) goes to stdout with the rest."""
    print(f"$ python -m {' '.join(args)}", flush=True)
    subprocess.run([sys.executable, "-m", *args], check=True, stderr=subprocess.STDOUT)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", nargs="+", default=list(ARCHS), choices=list(ARCHS))
    parser.add_argument("--n", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", nargs="+", default=["1", "16"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.archs:
            ckpt = Path(tmp) / f"{name}.pt"
            torch.save(reference_checkpoint(read_key_shapes(KEYS_DIR / f"{ARCHS[name]}.tsv")), ckpt)
            prefix = str(Path(tmp) / name.lower())
            run(["cn_clip.deploy.pytorch_to_onnx", "--model-arch", name, "--pytorch-ckpt-path", str(ckpt),
                 "--save-onnx-path", prefix, "--convert-text", "--convert-vision", "--int8", "--no-fp16"])  # fmt: skip
            run([
                "cn_clip.deploy.speed_benchmark", "--model-arch", name, "--pytorch-ckpt", str(ckpt),
                "--pytorch-precision", "fp32", "--device", "cpu", "--threads", str(args.threads), "--n", str(args.n),
                "--warmup", "2", "--batch-size", *args.batch_size,
                "--onnx-image-model", f"{prefix}.img.fp32.onnx", f"{prefix}.img.int8.onnx",
                "--onnx-text-model", f"{prefix}.txt.fp32.onnx", f"{prefix}.txt.int8.onnx",
            ])  # fmt: skip


if __name__ == "__main__":
    main()
