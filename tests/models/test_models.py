"""Tower shapes, FLIP masking, gradient checkpointing, logit-scale clamp and state-dict layout."""

from __future__ import annotations

import math

import pytest
import torch

from cn_clip.models.clip_model import LOGIT_SCALE_INIT, LOGIT_SCALE_MAX
from cn_clip.models.factory import create_model
from cn_clip.models.registry import get_model_config
from cn_clip.models.vit import flip_keep_count, random_patch_masking
from tests.fixtures.fixture_weights import KEYS_DIR
from tests.helpers import RN_TINY_ARCH, TINY_ARCH

TINY = [TINY_ARCH, RN_TINY_ARCH]
# Parameter counts of the released architectures (docs/compatibility.md#model-sizes).
PARAMS = {
    "ViT-B-16@RoBERTa-wwm-ext-base-chinese": 188_262_913,
    "ViT-L-14@RoBERTa-wwm-ext-base-chinese": 406_233_089,
    "ViT-L-14-336@RoBERTa-wwm-ext-base-chinese": 406_560_769,
    "ViT-H-14@RoBERTa-wwm-ext-large-chinese": 957_598_209,
    "RN50@RBT3-chinese": 76_989_537,
}


def _ids() -> torch.Tensor:
    return torch.tensor([[101, 3345, 2225, 7991, 102, 0, 0, 0], [101, 2207, 102, 0, 0, 0, 0, 0]])


@pytest.mark.parametrize("arch", TINY)
def test_shapes_and_normalisation(arch: str) -> None:
    torch.manual_seed(0)
    model = create_model(arch)
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        assert model.encode_image(images).shape == (3, 64)
        assert model.encode_text(_ids()).shape == (2, 64)
        image_n, text_n, scale = model(images, _ids())
        logits_per_image, logits_per_text = model.get_similarity(images, _ids())
    torch.testing.assert_close(image_n.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(text_n.norm(dim=-1), torch.ones(2))
    assert scale.item() == pytest.approx(1 / 0.07, rel=1e-6)
    assert logits_per_image.shape == (3, 2)
    torch.testing.assert_close(logits_per_text, logits_per_image.t())
    with pytest.raises(ValueError, match="cannot both be None"):
        model(None, None)


def test_text_padding_does_not_change_features() -> None:
    model = create_model(TINY_ARCH)
    ids = _ids()
    padded = torch.cat([ids, torch.zeros(2, 44, dtype=torch.long)], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(ids), model.encode_text(padded), atol=1e-6, rtol=0)
        alone = model.encode_text(ids[1:, :3])
    torch.testing.assert_close(alone, model.encode_text(padded)[1:], atol=1e-6, rtol=0)


@pytest.mark.parametrize(("length", "ratio", "kept"), [(197, 0.5, 98), (197, 0.75, 49), (17, 0.5, 8), (257, 0.3, 179)])
def test_flip_keeps_floor_of_patches_plus_cls(length: int, ratio: float, kept: int) -> None:
    assert flip_keep_count(length, ratio) == kept
    tokens = torch.randn(4, length, 8)
    masked = random_patch_masking(tokens, ratio, torch.Generator().manual_seed(0))
    assert masked.shape == (4, kept + 1, 8)
    torch.testing.assert_close(masked[:, 0], tokens[:, 0])
    for row in range(4):  # every kept token is a distinct original patch
        matches = (masked[row, 1:, None, :] == tokens[row, None, 1:, :]).all(-1).nonzero()[:, 1]
        assert len(set(matches.tolist())) == kept


def test_flip_in_model_and_rejected_for_resnet() -> None:
    vit = create_model(TINY_ARCH)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        masked = vit.encode_image(images, mask_ratio=0.5, generator=torch.Generator().manual_seed(0))
    assert masked.shape == (2, 64)
    with pytest.raises(ValueError, match="only defined for ViT"):
        create_model(RN_TINY_ARCH).encode_image(images, mask_ratio=0.5)
    with pytest.raises(ValueError, match="mask_ratio"):
        vit.encode_image(images, mask_ratio=1.0)


def _grads(model: torch.nn.Module, enable: bool) -> dict[str, torch.Tensor]:
    model.train()
    model.set_grad_checkpointing(enable)
    model.zero_grad()
    torch.manual_seed(7)
    image_n, text_n, scale = model(torch.randn(2, 3, 64, 64), _ids())
    (scale * image_n @ text_n.t()).logsumexp(dim=1).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", TINY)
def test_grad_checkpointing_gives_equal_gradients(arch: str) -> None:
    torch.manual_seed(0)
    model = create_model(arch)
    plain = _grads(model, False)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(state)
    checkpointed = _grads(model, True)
    visual = getattr(model.visual, "transformer", model.visual)
    assert visual.grad_checkpointing
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.bert.modules())
    assert plain.keys() == checkpointed.keys() and len(plain) > 10
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_logit_scale_init_and_clamp() -> None:
    model = create_model(TINY_ARCH)
    assert model.logit_scale.item() == pytest.approx(LOGIT_SCALE_INIT)
    with torch.no_grad():
        model.logit_scale.fill_(9.0)
    model.clamp_logit_scale()
    assert model.logit_scale.item() == pytest.approx(math.log(100))
    with torch.no_grad():
        model.logit_scale.fill_(-1.0)
    model.clamp_logit_scale()
    assert model.logit_scale.item() == 0.0
    assert pytest.approx(4.6052, abs=1e-4) == LOGIT_SCALE_MAX


def _reference_keys(arch: str) -> list[tuple[str, str]]:
    lines = (KEYS_DIR / f"{arch}.tsv").read_text(encoding="utf-8").splitlines()
    return [tuple(line.split("\t")) for line in lines if line and not line.startswith("#")]


@pytest.mark.parametrize("arch", sorted(PARAMS))
def test_state_dict_keys_equal_reference(arch: str) -> None:
    from cn_clip.models.clip_model import CLIP

    with torch.device("meta"):
        model = CLIP(get_model_config(arch))
    ours = [(k, str(list(v.shape)).replace(" ", "")) for k, v in model.state_dict().items()]
    reference = [(k, s.replace(" ", "")) for k, s in _reference_keys(arch)]
    assert ours == reference
    assert sum(p.numel() for p in model.parameters()) == PARAMS[arch]


def test_mixed_precision_keeps_reference_fp32_parts() -> None:
    model = create_model(TINY_ARCH, precision="fp16")
    dtypes = {k: v.dtype for k, v in model.state_dict().items()}
    assert dtypes["logit_scale"] == torch.float32
    assert dtypes["visual.class_embedding"] == torch.float32
    assert dtypes["visual.ln_pre.weight"] == torch.float32
    assert dtypes["visual.conv1.weight"] == torch.float16
    assert dtypes["visual.proj"] == torch.float16
    assert dtypes["text_projection"] == torch.float16
    assert dtypes["bert.embeddings.LayerNorm.weight"] == torch.float16
    assert model.dtype == torch.float16
