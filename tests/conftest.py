"""Shared fixtures: tiny models on CPU with fixed seeds, and the gpu marker's skip."""

from __future__ import annotations

import pytest
import torch

TINY_ARCH = "ViT-Tiny@BERT-Tiny-chinese"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed_and_threads() -> None:
    torch.manual_seed(0)


@pytest.fixture()
def tiny_model():
    from cn_clip.models.factory import create_model

    return create_model(TINY_ARCH)
