"""open_clip interop: golden features from open_clip_torch 3.3.0 (tests/fixtures/gen_open_clip_fixtures.py) for a
tiny XLM-R CLIP and a tiny plain ViT CLIP, in both conversion directions (≤ 1e-5)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cn_clip.convert import main as convert_main
from cn_clip.errors import CheckpointError, ConfigError
from cn_clip.models.factory import create_model, load_from_name
from cn_clip.models.registry import add_model_config
from cn_clip.tokenizer import get_tokenizer

FIXTURES = Path(__file__).parents[1] / "fixtures" / "open_clip"
MODELS = {"xlmr": "oc-tiny-vit@oc-tiny-xlmr", "plain": "oc-tiny-vit@oc-tiny-clip-text"}
ATOL = 1e-5


@pytest.fixture(autouse=True, scope="module")
def _towers() -> None:
    add_model_config(FIXTURES / "towers")


def golden(name: str) -> dict[str, np.ndarray]:
    return dict(np.load(FIXTURES / f"{name}.npz"))


def features(model, data: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        image = model.encode_image(torch.from_numpy(data["images"])).numpy()
        text = model.encode_text(torch.from_numpy(data["ids"])).numpy()
    return image, text


@pytest.mark.parametrize("name", MODELS)
def test_open_clip_checkpoints_load_with_identical_features(name: str) -> None:
    data = golden(name)
    assert np.abs(data["text_features"]).std() > 0.05 and np.abs(np.diff(data["text_features"], axis=0)).max() > 0.05
    model = create_model(MODELS[name], FIXTURES / f"{name}.open_clip.pt")
    image, text = features(model, data)
    np.testing.assert_allclose(image, data["image_features"], atol=ATOL, rtol=0)
    np.testing.assert_allclose(text, data["text_features"], atol=ATOL, rtol=0)
    captions = json.loads(str(data["captions"]))
    ids = get_tokenizer(model.cfg)(captions)  # the tower's context_length is open_clip's
    assert np.array_equal(ids.numpy(), data["ids"]), "our tokenizer differs from open_clip's HFTokenizer"


@pytest.mark.parametrize("name", MODELS)
def test_from_open_clip_cli_and_load_from_name(name: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = golden(name)
    out = tmp_path / "ours.pt"
    assert (
        convert_main(["from-open-clip", str(FIXTURES / f"{name}.open_clip.pt"), str(out), "--arch", MODELS[name]]) == 0
    )
    assert "Checkpoint written to" in capsys.readouterr().out
    saved = torch.load(out, map_location="cpu", weights_only=True)
    assert all(k.startswith("module.") for k in saved["state_dict"]) and saved["step"] == 0
    vision, text = MODELS[name].split("@")
    model, preprocess = load_from_name(str(out), device="cpu", vision_model_name=vision, text_model_name=text)
    image, text_features = features(model, data)
    np.testing.assert_allclose(image, data["image_features"], atol=ATOL, rtol=0)
    np.testing.assert_allclose(text_features, data["text_features"], atol=ATOL, rtol=0)
    direct, _ = load_from_name(str(FIXTURES / f"{name}.open_clip.pt"), "cpu", None, vision, text)
    np.testing.assert_allclose(features(direct, data)[1], data["text_features"], atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", MODELS)
def test_to_open_clip_features_match_open_clip(name: str, tmp_path: Path) -> None:
    """``*.ours.pt`` was converted by to-open-clip and run in open_clip by the generator (``to_oc_*``): our model
    gives the same features, and converting again gives weights that read back to the same model."""
    data = golden(name)
    ours = FIXTURES / f"{name}.ours.pt"
    model = create_model(MODELS[name], ours)
    image, text = features(model, data)
    np.testing.assert_allclose(image, data["to_oc_image_features"], atol=ATOL, rtol=0)
    np.testing.assert_allclose(text, data["to_oc_text_features"], atol=ATOL, rtol=0)
    out = tmp_path / "oc"
    assert convert_main(["to-open-clip", str(ours), str(out), "--arch", MODELS[name]]) == 0
    state = torch.load(out / "open_clip_pytorch_model.bin", map_location="cpu", weights_only=True)
    config = json.loads((out / "open_clip_config.json").read_text())
    assert config["embed_dim"] == 32 and config["vision_cfg"]["patch_size"] == 8 and "quick_gelu" not in config
    if name == "plain":
        assert {"token_embedding.weight", "ln_final.weight", "text_projection"} <= set(state)
        assert config["text_cfg"]["context_length"] == 16 and "hf_model_name" not in config["text_cfg"]
    else:
        assert any(k.startswith("text.transformer.") for k in state)
        assert config["text_cfg"]["hf_pooler_type"] == "mean_pooler" and config["text_cfg"]["hf_proj_type"] == "mlp"
    again = create_model(MODELS[name], state).state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(again[key], value), key
    assert convert_main(["to-open-clip", str(ours), str(out), "--arch", MODELS[name]]) == 2  # one line, no overwrite


def test_open_clip_names_resolve_to_registered_towers() -> None:
    from cn_clip.deploy.openclip import open_clip_model_config, resolve_architecture
    from cn_clip.models.clip_layouts import OPEN_CLIP_ARCHITECTURES
    from cn_clip.models.factory import resolve_config

    for oc_name, arch in OPEN_CLIP_ARCHITECTURES.items():
        assert resolve_architecture(oc_name) == arch
        cfg = resolve_config(arch)  # builds no model: hub ids need not be cached
        assert cfg.text.kind == "hf" and cfg.text.pooler == "mean" and cfg.text.proj == "mlp"
        assert cfg.vision.vision_act == ("quick_gelu" if oc_name == "roberta-ViT-B-32" else "gelu")
    assert resolve_config("ViT-B-32@RBT3-chinese").vision.vision_act == "quick_gelu"  # the reference's tower
    with pytest.raises(ConfigError, match="BERT"):
        open_clip_model_config(resolve_config("ViT-B-16@RoBERTa-wwm-ext-base-chinese"))


def test_open_clip_checkpoint_needs_named_towers() -> None:
    with pytest.raises(CheckpointError, match="give vision_model_name/text_model_name"):
        load_from_name(str(FIXTURES / "xlmr.open_clip.pt"), device="cpu")


def test_trainer_resumes_from_an_open_clip_checkpoint(tmp_path: Path) -> None:
    from tests.training.helpers import tiny_args, train

    resume = ["--resume", str(FIXTURES / "plain.open_clip.pt"), "--reset-data-offset", "--context-length", "16"]
    argv = tiny_args(tmp_path, *resume, steps=1)
    argv[argv.index("ViT-Tiny")] = "oc-tiny-vit"
    argv[argv.index("BERT-Tiny-chinese")] = "oc-tiny-clip-text"
    summary = train(argv)
    assert len(summary["losses"]) == 1 and np.isfinite(summary["losses"][0])
