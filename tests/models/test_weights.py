"""Checkpoint loading: prefixes, pooler keys, flash layout, strict errors, refused pickles."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch

from cn_clip.errors import CheckpointError, ConfigError
from cn_clip.models.factory import create_model, load, load_checkpoint_into
from cn_clip.models.registry import get_model_config
from cn_clip.weights import convert_state_dict, read_checkpoint
from tests.helpers import RN_TINY_ARCH, TINY_ARCH


@pytest.fixture(scope="module")
def source_model():
    torch.manual_seed(3)
    return create_model(TINY_ARCH)


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


@pytest.mark.parametrize("prefix", ["module.", ""])
@pytest.mark.parametrize("with_pooler", [True, False])
def test_reference_layout_loads(tmp_path: Path, source_model, prefix: str, with_pooler: bool) -> None:
    state = {f"{prefix}{k}": v for k, v in source_model.state_dict().items()}
    if with_pooler:
        state[f"{prefix}bert.pooler.dense.weight"] = torch.zeros(64, 64)
        state[f"{prefix}bert.pooler.dense.bias"] = torch.zeros(64)
    path = tmp_path / "ckpt.pt"
    torch.save({"epoch": 3, "step": 40, "name": "x", "state_dict": state}, path)
    target = create_model(TINY_ARCH)
    meta = load_checkpoint_into(target, path)
    assert meta == {"epoch": 3, "step": 40, "name": "x"}
    assert _same(source_model, target)


def test_flash_layout_round_trip(source_model) -> None:
    flash = convert_state_dict({f"module.{k}": v for k, v in source_model.state_dict().items()})
    assert any(".Wqkv." in k for k in flash) and all(k.startswith("module.") for k in flash)
    target = create_model(TINY_ARCH)
    load_checkpoint_into(target, {"state_dict": flash})
    assert _same(source_model, target)


def test_safetensors_checkpoint(tmp_path: Path, source_model) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in source_model.state_dict().items()}, str(path))
    target = create_model(TINY_ARCH, checkpoint=path)
    assert _same(source_model, target)


def _edit(state: dict, case: str) -> dict:
    state = dict(state)
    if case == "missing":
        del state["visual.proj"]
    elif case == "unexpected":
        state["visual.extra.weight"] = torch.zeros(1)
    elif case == "shape":
        state["text_projection"] = torch.zeros(64, 32)
    return state


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing", r"missing keys: visual\.proj"),
        ("unexpected", r"unexpected keys: visual\.extra\.weight"),
        ("shape", r"shape mismatches: text_projection \[64, 32\] vs model \[64, 64\]"),
    ],
)
def test_strict_errors_name_the_key(source_model, case: str, message: str) -> None:
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint_into(create_model(TINY_ARCH), {"state_dict": _edit(source_model.state_dict(), case)})


def test_wrong_architecture_is_reported(source_model) -> None:
    with pytest.raises(CheckpointError, match=f"does not fit {RN_TINY_ARCH}"):
        create_model(RN_TINY_ARCH, checkpoint={"state_dict": source_model.state_dict()})


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/cn_clip_pwned",))


def test_code_executing_pickle_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    with open(path, "wb") as handle:
        pickle.dump({"state_dict": _Evil()}, handle)
    with pytest.raises(CheckpointError, match="refused to unpickle"):
        read_checkpoint(path)
    assert not Path("/tmp/cn_clip_pwned").exists()


def test_truncated_and_missing_files(tmp_path: Path, source_model) -> None:
    path = tmp_path / "ckpt.pt"
    torch.save({"state_dict": source_model.state_dict()}, path)
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        read_checkpoint(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        read_checkpoint(tmp_path / "nope.pt")
    torch.save([1, 2], path)
    with pytest.raises(CheckpointError, match="expected a dict"):
        read_checkpoint(path)


@pytest.mark.parametrize("seed", range(20))
def test_random_bytes_are_a_checkpoint_error(tmp_path: Path, seed: int) -> None:
    import random

    path = tmp_path / "noise.pt"
    rng = random.Random(seed)
    path.write_bytes(rng.randbytes(rng.randrange(1, 4096)))
    with pytest.raises(CheckpointError, match="noise.pt"):
        read_checkpoint(path)


def test_partial_init_from_flat_dicts(tmp_path: Path, source_model) -> None:
    state = source_model.state_dict()
    clip_path, bert_path = tmp_path / "clip.pt", tmp_path / "bert.pt"
    torch.save({k: v for k, v in state.items() if k.startswith("visual") or k == "logit_scale"}, clip_path)
    torch.save({k: v for k, v in state.items() if k.startswith("bert")}, bert_path)
    target = load(create_model(TINY_ARCH), "cpu", clip_path=str(clip_path), bert_path=str(bert_path))
    for key, value in state.items():
        if key != "text_projection":
            assert torch.equal(target.state_dict()[key], value), key
    torch.save({"visual.nope": torch.zeros(1)}, clip_path)
    with pytest.raises(CheckpointError, match="visual.nope"):
        load(create_model(TINY_ARCH), "cpu", clip_path=str(clip_path))


def test_position_embedding_resized_for_new_resolution(source_model) -> None:
    model = create_model(TINY_ARCH, checkpoint={"state_dict": source_model.state_dict()}, input_resolution=96)
    assert model.visual.positional_embedding.shape == (37, 64)
    assert torch.equal(model.visual.positional_embedding[0], source_model.visual.positional_embedding[0])


@pytest.mark.parametrize(
    ("name", "message"),
    [("ViT-B-16", "must be '<vision>@<text>'"), ("Nope@BERT-Tiny-chinese", "unknown vision model 'Nope'")],
)
def test_bad_model_names(name: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        get_model_config(name)


def test_unknown_config_key_rejected(tmp_path: Path, monkeypatch) -> None:
    from cn_clip.models import registry
    from cn_clip.models.registry import add_model_config

    registry.list_towers()  # scan the built-in configs, then keep this test's registration private
    monkeypatch.setattr(registry, "_TOWERS", dict(registry._TOWERS))
    monkeypatch.setattr(registry, "_SOURCES", dict(registry._SOURCES))

    bad = tmp_path / "Bad-ViT.json"
    bad.write_text('{"embed_dim": 8, "image_resolution": 32, "vision_layers": 1, "vision_width": 32, "vison_patch": 8}')
    add_model_config(bad)
    with pytest.raises(ConfigError, match="Bad-ViT.json: unknown key\\(s\\) vison_patch"):
        get_model_config("Bad-ViT@BERT-Tiny-chinese")
