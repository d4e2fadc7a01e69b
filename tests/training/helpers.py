"""Shared helpers for the training tests: tiny in-process runs on synthetic data."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.helpers import TINY_FLAGS


def tiny_args(logs: Path | str, *extra: str, steps: int = 4, data: str = "synthetic:16:4", batch: int = 4) -> list[str]:
    return [
        "--train-data", data,
        *TINY_FLAGS,
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
