"""Loading builds no random weights and reads the file once: the result equals random init + copy, bit for bit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import cn_clip.weights
from cn_clip.errors import CheckpointError
from cn_clip.models.factory import create_model, load_checkpoint_into, load_from_name
from tests.fixtures.fixture_weights import KEYS_DIR, fixture_images, read_key_shapes, reference_checkpoint

ARCHS = ["ViT-Tiny@BERT-Tiny-chinese", "RN-Tiny@BERT-Tiny-chinese", "RN50@RBT3-chinese"]
TINY = ARCHS[0]


def _save(arch: str, path: Path, dtype: torch.dtype = torch.float16, **save_kwargs) -> Path:
    """A reference-layout file stored in ``dtype`` (fp16: the cast to fp32 on load is exercised)."""
    ckpt = reference_checkpoint(read_key_shapes(KEYS_DIR / f"{arch}.tsv"))
    ckpt["state_dict"] = {k: v.to(dtype) if v.is_floating_point() else v for k, v in ckpt["state_dict"].items()}
    torch.save(ckpt, path, **save_kwargs)
    return path


def _copy_loaded(arch: str, path: Path) -> torch.nn.Module:
    """The old way: randomly initialised model, then the checkpoint copied in."""
    model = create_model(arch)
    load_checkpoint_into(model, path)
    return model.eval()


def _tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}  # non-persistent buffers included


@pytest.mark.parametrize("arch", ARCHS)
def test_features_bit_identical_to_random_init_then_copy(arch: str, tmp_path: Path) -> None:
    path = _save(arch, tmp_path / "ckpt.pt")
    loaded, _ = load_from_name(str(path), device="cpu")  # architecture inferred from the same read
    before = _copy_loaded(arch, path)
    assert loaded.cfg == before.cfg and not loaded.training
    ours, theirs = _tensors(loaded), _tensors(before)
    assert list(ours) == list(theirs)
    for name, tensor in ours.items():
        assert tensor.device.type == "cpu", name
        assert tensor.dtype == theirs[name].dtype and torch.equal(tensor, theirs[name]), name
    assert all(p.dtype == torch.float32 and p.requires_grad for p in loaded.parameters())
    resolution = loaded.cfg.vision.image_resolution
    text = torch.tensor([[101, 2769, 4263, 872, 102, 0, 0], [101, 1045, 102, 0, 0, 0, 0]])
    images = fixture_images(resolution)
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(images), before.encode_image(images))
        assert torch.equal(loaded.encode_text(text), before.encode_text(text))


def test_non_persistent_buffers_are_computed(tmp_path: Path) -> None:
    model = create_model(TINY, checkpoint=_save(TINY, tmp_path / "ckpt.pt"))
    embeddings = model.bert.embeddings
    length = model.cfg.text.text_max_position_embeddings
    assert torch.equal(embeddings.position_ids, torch.arange(length).unsqueeze(0))
    assert torch.equal(embeddings.token_type_ids, torch.zeros(1, length, dtype=torch.long))


def test_checkpoint_read_once_memory_mapped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _save(TINY, tmp_path / "ckpt.pt")
    calls = []
    real_load = torch.load

    def counting_load(*args, **kwargs):
        calls.append(kwargs.get("mmap"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(cn_clip.weights.torch, "load", counting_load)
    load_from_name(str(path), device="cpu")  # no tower names: the architecture is inferred too
    assert calls == [True]


def test_legacy_non_zip_file_still_loads(tmp_path: Path) -> None:
    path = _save(TINY, tmp_path / "old.pt", _use_new_zipfile_serialization=False)  # cannot be memory-mapped
    model, _ = load_from_name(str(path), device="cpu")
    before = _copy_loaded(TINY, path)
    assert all(torch.equal(v, before.state_dict()[k]) for k, v in model.state_dict().items())


def test_fp32_file_loads_unchanged(tmp_path: Path) -> None:
    path = _save(TINY, tmp_path / "ckpt.pt", dtype=torch.float32)
    model = create_model(TINY, checkpoint=path)
    assert all(torch.equal(v, _copy_loaded(TINY, path).state_dict()[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("damage", ["missing", "unexpected", "shape"])
def test_strict_key_errors_unchanged(tmp_path: Path, damage: str) -> None:
    ckpt = reference_checkpoint(read_key_shapes(KEYS_DIR / f"{TINY}.tsv"))
    state = ckpt["state_dict"]
    if damage == "missing":
        del state["module.visual.proj"]
    elif damage == "unexpected":
        state["module.visual.extra"] = torch.zeros(3)
    else:
        state["module.text_projection"] = torch.zeros(5, 5)
    path = tmp_path / "bad.pt"
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError) as copied:
        load_checkpoint_into(create_model(TINY), path)
    with pytest.raises(CheckpointError) as assigned:
        create_model(TINY, checkpoint=path)
    assert str(assigned.value) == str(copied.value)
    assert str(assigned.value).startswith(f"{path} does not fit ViT-Tiny@BERT-Tiny-chinese: ")
    with pytest.raises(CheckpointError, match=str(path)):
        load_from_name(str(path), device="cpu", vision_model_name="ViT-Tiny", text_model_name="BERT-Tiny-chinese")


def test_from_scratch_models_are_randomly_initialised() -> None:
    torch.manual_seed(0)
    first = create_model(TINY)
    torch.manual_seed(1)
    second = create_model(TINY)
    for name, param in first.named_parameters():
        assert param.device.type == "cpu" and torch.isfinite(param).all(), name
    weight = first.visual.transformer.resblocks[0].mlp.c_fc.weight
    assert weight.std() > 0 and not torch.equal(weight, second.visual.transformer.resblocks[0].mlp.c_fc.weight)
    assert not torch.equal(first.bert.embeddings.word_embeddings.weight, second.bert.embeddings.word_embeddings.weight)
    assert torch.equal(first.bert.embeddings.position_ids, second.bert.embeddings.position_ids)
