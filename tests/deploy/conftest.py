"""Tiny checkpoints in the reference layout (deterministic, fp16-representable weights) for the deploy tests."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).parents[1] / "fixtures"
sys.path.insert(0, str(FIXTURES))
from fixture_weights import KEYS_DIR, read_key_shapes, reference_checkpoint  # noqa: E402

VIT_TINY = "ViT-Tiny@BERT-Tiny-chinese"
RN_TINY = "RN-Tiny@BERT-Tiny-chinese"


def save_checkpoint(arch: str, path: Path) -> Path:
    torch.save(reference_checkpoint(read_key_shapes(KEYS_DIR / f"{arch}.tsv")), path)
    return path


@pytest.fixture(scope="session")
def vit_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_checkpoint(VIT_TINY, tmp_path_factory.mktemp("ckpt") / "vit_tiny.pt")


@pytest.fixture(scope="session")
def rn_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_checkpoint(RN_TINY, tmp_path_factory.mktemp("ckpt") / "rn_tiny.pt")


@pytest.fixture(scope="session")
def vit_model(vit_ckpt: Path):
    from cn_clip.models.factory import create_model

    return create_model(VIT_TINY, checkpoint=vit_ckpt)


@pytest.fixture(scope="session")
def rn_model(rn_ckpt: Path):
    from cn_clip.models.factory import create_model

    return create_model(RN_TINY, checkpoint=rn_ckpt)
