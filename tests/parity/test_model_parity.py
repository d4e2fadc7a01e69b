"""Our loader + towers reproduce the reference's features from the same checkpoint file (fixtures made by
tests/fixtures/gen_model_fixtures.py with the reference package)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cn_clip.models.factory import load_from_name
from tests.fixtures.fixture_weights import fixture_images
from tests.helpers import FIXTURES, RN_TINY_ARCH, TINY_ARCH, save_reference_checkpoint

FAST = [TINY_ARCH, RN_TINY_ARCH, "RN50@RBT3-chinese"]
SLOW = [
    "ViT-B-16@RoBERTa-wwm-ext-base-chinese",
    "ViT-L-14@RoBERTa-wwm-ext-base-chinese",
    "ViT-L-14-336@RoBERTa-wwm-ext-base-chinese",
    "ViT-H-14@RoBERTa-wwm-ext-large-chinese",
]
TOLERANCE = 1e-5


def _check(arch: str, tmp_path: Path, by_inference: bool = False) -> None:
    golden = np.load(FIXTURES / "model_parity" / f"{arch}.npz")
    path = save_reference_checkpoint(arch, tmp_path / "ckpt.pt")
    vision, text = arch.split("@")
    resolution = int(golden["resolution"])
    names = {} if by_inference else {"vision_model_name": vision, "text_model_name": text}
    model, _ = load_from_name(str(path), device="cpu", input_resolution=resolution, **names)
    assert not model.training
    with torch.no_grad():
        image_features = model.encode_image(fixture_images(resolution)).double().numpy()
        text_features = model.encode_text(torch.from_numpy(golden["text_ids"])).double().numpy()
        logits, _ = model.get_similarity(fixture_images(resolution), torch.from_numpy(golden["text_ids"]))
    np.testing.assert_allclose(image_features, golden["image_features"], atol=TOLERANCE, rtol=0)
    np.testing.assert_allclose(text_features, golden["text_features"], atol=TOLERANCE, rtol=0)
    np.testing.assert_allclose(logits.double().numpy(), golden["logits_per_image"], atol=1e-3, rtol=0)


@pytest.mark.parametrize("arch", FAST)
def test_features_match_reference(arch: str, tmp_path: Path) -> None:
    _check(arch, tmp_path)


def test_architecture_inferred_from_shapes(tmp_path: Path) -> None:
    _check(TINY_ARCH, tmp_path, by_inference=True)


@pytest.mark.slow
@pytest.mark.parametrize("arch", SLOW)
def test_large_features_match_reference(arch: str, tmp_path: Path) -> None:
    _check(arch, tmp_path)
