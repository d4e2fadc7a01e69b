"""LR schedule and weight-decay groups against the reference's golden values."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from cn_clip.training.optim import default_hparams, param_groups, split_decay
from cn_clip.training.schedule import constant_lr, cosine_lr
from tests.helpers import FIXTURES, TINY_ARCH

GOLDEN = FIXTURES / "training"


@pytest.mark.parametrize("row", json.loads((GOLDEN / "schedule.json").read_text()), ids=lambda r: str(r["steps"]))
def test_cosine_matches_reference(row: dict) -> None:
    for step, value in row["values"].items():
        assert cosine_lr(int(step), row["base_lr"], row["warmup"], row["steps"]) == pytest.approx(value, rel=1e-12)


def test_constant_lr() -> None:
    assert constant_lr(7, 1e-3, 5, 10) == 1e-3


def _meta_model(arch: str):
    from cn_clip.models.clip_model import CLIP
    from cn_clip.models.registry import get_model_config

    with torch.device("meta"):
        return CLIP(get_model_config(arch))


@pytest.mark.parametrize("arch", list(json.loads((GOLDEN / "wd_groups.json").read_text())))
def test_reference_decay_groups_equal_reference(arch: str) -> None:
    expected = json.loads((GOLDEN / "wd_groups.json").read_text())[arch]
    no_decay, decay = split_decay(_meta_model(arch), "reference")
    assert (len(no_decay), len(decay)) == (expected["no_decay"], expected["decay"])
    digest = lambda names: hashlib.sha256("\n".join(f"module.{n}" for n in names).encode()).hexdigest()  # noqa: E731
    assert digest(no_decay) == expected["no_decay_sha256"]
    assert digest(decay) == expected["decay_sha256"]


def test_spec_counts() -> None:
    assert [len(g) for g in split_decay(_meta_model("ViT-B-16@RoBERTa-wwm-ext-base-chinese"))] == [198, 153]
    assert [len(g) for g in split_decay(_meta_model("RN50@RBT3-chinese"))] == [136, 93]


def test_role_groups() -> None:
    model = _meta_model(TINY_ARCH)
    no_decay, decay = split_decay(model, "role")
    assert "bert.encoder.layer.0.attention.output.LayerNorm.weight" in no_decay  # decayed by the reference
    assert "bert.embeddings.word_embeddings.weight" in no_decay
    assert "visual.positional_embedding" in no_decay and "logit_scale" in no_decay
    assert "visual.proj" in decay and "text_projection" in decay
    groups = param_groups(model, 0.1, "role")
    assert groups[0]["weight_decay"] == 0.0 and groups[1]["weight_decay"] == 0.1


def test_frozen_parameters_left_out() -> None:
    model = _meta_model(TINY_ARCH)
    model.visual.requires_grad_(False)
    assert not any(n.startswith("visual.") for g in split_decay(model) for n in g)


def test_default_hparams() -> None:
    assert default_hparams("RN50") == (5e-4, (0.9, 0.999), 1e-8)
    assert default_hparams("ViT-L-14-336") == (4e-4, (0.9, 0.98), 1e-6)
    assert default_hparams("ViT-B-16") == (5e-4, (0.9, 0.98), 1e-6)
