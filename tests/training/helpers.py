"""Shared helpers for the training tests: tiny in-process runs on synthetic data."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures"
TINY = "ViT-Tiny@BERT-Tiny-chinese"
sys.path.insert(0, str(FIXTURES))


def tiny_args(logs: Path | str, *extra: str, steps: int = 4, data: str = "synthetic:16:4", batch: int = 4) -> list[str]:
    return [
        "--train-data", data,
        "--vision-model", "ViT-Tiny",
        "--text-model", "BERT-Tiny-chinese",
        "--batch-size", str(batch),
        "--valid-batch-size", str(batch),
        "--num-workers", "0",
        "--valid-num-workers", "0",
        "--logs", str(logs),
        "--name", "run",
        "--lr", "1e-3",
        "--warmup", "2",
        "--log-interval", "1",
        "--max-steps", str(steps),
        "--precision", "fp32",
        *extra,
    ]  # fmt: skip


def train(argv: list[str]) -> dict:
    from cn_clip.training.main import train as _train
    from cn_clip.training.params import parse_args

    return _train(parse_args(argv))


def latest_state(logs: Path) -> dict[str, torch.Tensor]:
    ckpt = torch.load(logs / "run" / "checkpoints" / "epoch_latest.pt", map_location="cpu", weights_only=True)
    return ckpt["state_dict"]


def fixture_model():
    """The tiny ViT model with the fp16-representable fixture weights the reference fixtures use."""
    from fixture_weights import KEYS_DIR, fixture_state_dict, read_key_shapes

    from cn_clip.models.factory import create_model

    return create_model(TINY, checkpoint=fixture_state_dict(read_key_shapes(KEYS_DIR / f"{TINY}.tsv")))
