"""Hugging Face conversion: files, bit-identical round trip, feature parity with HF, preprocessing equality."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from cn_clip.convert import main
from cn_clip.deploy import hf as H

CAPTIONS = ["杰尼龟", "一只在草地上奔跑的金毛小狗", "Hello, World! Café", "高级感托特包斜挎，大容量通勤女包"]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory, vit_ckpt: Path) -> Path:
    out = tmp_path_factory.mktemp("hf") / "model"
    assert main(["to-hf", str(vit_ckpt), str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def hf_model(hf_dir: Path):
    from transformers import ChineseCLIPModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ChineseCLIPModel.from_pretrained(str(hf_dir)).eval()


def _photo():
    from PIL import Image
    from skimage import data

    return Image.fromarray(data.chelsea())  # 451x300: non-square, so squash vs crop matters


def test_folder_has_model_tokenizer_and_processor_files(hf_dir: Path) -> None:
    names = {p.name for p in hf_dir.iterdir()}
    wanted = {"config.json", "model.safetensors", "vocab.txt", "preprocessor_config.json", "tokenizer_config.json"}
    assert wanted <= names
    assert (hf_dir / "vocab.txt").read_bytes() == (Path(H.__file__).parents[1] / "vocab.txt").read_bytes()


def test_round_trip_is_bit_identical(hf_dir: Path, vit_ckpt: Path, tmp_path: Path) -> None:
    back = tmp_path / "back.pt"
    assert main(["from-hf", str(hf_dir), str(back)]) == 0
    original = torch.load(vit_ckpt, weights_only=True)["state_dict"]
    converted = torch.load(back, weights_only=True)
    assert {"epoch", "step", "name", "state_dict"} <= set(converted)
    assert list(converted["state_dict"]) == list(original)  # same keys, same (reference) order, module. prefix
    for key, value in original.items():
        assert converted["state_dict"][key].dtype == value.dtype
        assert torch.equal(converted["state_dict"][key], value), key


def test_hf_features_match_ours(hf_model, vit_model) -> None:
    from cn_clip.tokenizer import tokenize

    text = tokenize(CAPTIONS)
    image = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hf_image = hf_model.get_image_features(pixel_values=image)
        hf_text = hf_model.get_text_features(input_ids=text, attention_mask=(text != 0).long())
        hf_image = getattr(hf_image, "pooler_output", hf_image)  # transformers 5 returns an output object
        hf_text = getattr(hf_text, "pooler_output", hf_text)
        torch.testing.assert_close(hf_image, vit_model.encode_image(image), atol=1e-5, rtol=0)
        torch.testing.assert_close(hf_text, vit_model.encode_text(text), atol=1e-5, rtol=0)
    assert hf_model.logit_scale.item() == vit_model.logit_scale.item()


def test_hf_processor_pipeline_matches_ours(hf_dir: Path, hf_model, vit_model) -> None:
    """HF tokenizer + PIL image processor + HF model give our similarity logits on a real photo."""
    from transformers import AutoImageProcessor, AutoTokenizer

    from cn_clip.transforms import image_transform

    photo = _photo()
    tokens = AutoTokenizer.from_pretrained(str(hf_dir))(CAPTIONS, padding=True, return_tensors="pt")
    pixels = AutoImageProcessor.from_pretrained(str(hf_dir), backend="pil")(images=photo, return_tensors="pt")
    with torch.no_grad():
        out = hf_model(**tokens, pixel_values=pixels["pixel_values"])
        ours, _ = vit_model.get_similarity(image_transform(64)(photo).unsqueeze(0), tokenize_captions())
    torch.testing.assert_close(out.logits_per_image, ours, atol=1e-4, rtol=0)


def tokenize_captions() -> torch.Tensor:
    from cn_clip.tokenizer import tokenize

    return tokenize(CAPTIONS)


def test_hf_preprocessing_equals_ours_on_a_non_square_photo(hf_dir: Path) -> None:
    from transformers import AutoImageProcessor

    from cn_clip.transforms import image_transform

    photo = _photo()
    ours = image_transform(64)(photo)
    pil = AutoImageProcessor.from_pretrained(str(hf_dir), backend="pil")(images=photo, return_tensors="pt")
    torch.testing.assert_close(pil["pixel_values"][0], ours, atol=1e-6, rtol=0)  # squash, no crop: exact
    # The default torchvision backend resizes with its own antialiasing kernel: within one grey level.
    fast = AutoImageProcessor.from_pretrained(str(hf_dir))(images=photo, return_tensors="pt")
    assert fast["pixel_values"].shape == (1, 3, 64, 64)
    assert (fast["pixel_values"][0] - ours).abs().max() < 1.5 / 255 / 0.26


def test_hf_tokenizer_matches_ours(hf_dir: Path) -> None:
    from transformers import AutoTokenizer

    from cn_clip.tokenizer import tokenize

    hf_ids = AutoTokenizer.from_pretrained(str(hf_dir))(CAPTIONS, padding="max_length", max_length=52)["input_ids"]
    assert hf_ids == tokenize(CAPTIONS).tolist()


def test_resnet_has_no_hf_counterpart(rn_ckpt: Path, tmp_path: Path, capsys) -> None:
    assert main(["to-hf", str(rn_ckpt), str(tmp_path / "rn")]) == 2
    assert "no Hugging Face ChineseCLIPModel counterpart" in capsys.readouterr().err
    assert not (tmp_path / "rn").exists()


def test_existing_output_needs_overwrite(hf_dir: Path, vit_ckpt: Path, capsys) -> None:
    assert main(["to-hf", str(vit_ckpt), str(hf_dir)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_from_hf_rejects_a_folder_without_config(tmp_path: Path, capsys) -> None:
    assert main(["from-hf", str(tmp_path), str(tmp_path / "x.pt")]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_key_map_is_inverse_for_a_full_size_layout() -> None:
    """ViT-B-16 key names and shapes (meta tensors, no weights) survive to_hf → from_hf."""
    from cn_clip.models.clip_model import CLIP
    from cn_clip.models.registry import get_model_config

    cfg = get_model_config("ViT-B-16@RoBERTa-wwm-ext-base-chinese")
    with torch.device("meta"):
        state = CLIP(cfg).state_dict()
    hf_state = H.to_hf_state_dict(state)
    assert hf_state["visual_projection.weight"].shape == (512, 768)
    assert hf_state["vision_model.encoder.layers.0.self_attn.q_proj.weight"].shape == (768, 768)
    back = H.reference_order(H.from_hf_state_dict(hf_state), cfg)
    assert {k: v.shape for k, v in back.items()} == {k: v.shape for k, v in state.items()}
