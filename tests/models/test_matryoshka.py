"""Matryoshka embeddings: truncation, the nested loss, training with --matryoshka-dims, extraction and search."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cn_clip.errors import ConfigError
from cn_clip.models.matryoshka import parse_dims, truncate
from cn_clip.training.loss import ClipLoss, MatryoshkaLoss
from tests.helpers import TINY_FLAGS, make_retrieval_dataset
from tests.helpers import seeded_checkpoint as tiny_checkpoint


def test_encode_dim_equals_slice_and_renormalise(tiny_model) -> None:
    tiny_model.eval()
    images = torch.randn(3, 3, 64, 64)
    texts = torch.tensor([[101, 2769, 4263, 102, 0], [101, 4344, 102, 0, 0]])
    with torch.no_grad():
        full_image, full_text = tiny_model.encode_image(images), tiny_model.encode_text(texts)
        for k in (64, 32, 8, 1):
            torch.testing.assert_close(tiny_model.encode_image(images, dim=k), F.normalize(full_image[:, :k], dim=-1))
            torch.testing.assert_close(tiny_model.encode_text(texts, dim=k), F.normalize(full_text[:, :k], dim=-1))
    # scaling a row first changes nothing: normalised and unnormalised features truncate alike
    torch.testing.assert_close(truncate(F.normalize(full_text, dim=-1), 16), truncate(full_text, 16))


@pytest.mark.parametrize("dim", [0, 65, -1])
def test_encode_dim_out_of_range_is_refused(tiny_model, dim: int) -> None:
    with pytest.raises(ConfigError, match=f"--dim {dim}: must be an integer between 1 and the model's embed_dim 64"):
        tiny_model.encode_text(torch.tensor([[101, 102]]), dim=dim)


def _pairs(seed: int = 0, batch: int = 6, width: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(batch, width, generator=gen), dim=-1)
    text = F.normalize(torch.randn(batch, width, generator=gen), dim=-1)
    return image, text


def test_loss_with_one_full_dim_equals_plain_loss() -> None:
    image, text = _pairs()
    scale = torch.tensor(10.0)
    plain, plain_acc = ClipLoss()(image, text, scale)
    nested, nested_acc = MatryoshkaLoss(ClipLoss(), (32,))(image, text, scale)
    assert torch.equal(plain, nested)
    assert plain_acc == nested_acc


def test_loss_is_mean_over_truncated_widths() -> None:
    image, text = _pairs(1)
    image.requires_grad_(True)
    scale = torch.tensor(5.0)
    loss, _ = MatryoshkaLoss(ClipLoss(), (8, 32, 16))(image, text, scale)
    expected = sum(ClipLoss()(truncate(image, k), truncate(text, k), scale)[0] for k in (32, 16, 8)) / 3
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert image.grad is not None and bool(image.grad[:, :8].abs().sum() > 0)


@pytest.mark.parametrize(
    ("text", "message"),
    [("512,x", "expected distinct positive"), ("64,64", "expected distinct positive"), ("0", "expected distinct")],
)
def test_parse_dims_errors(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_dims(text)
    assert parse_dims("64, 512,128") == (512, 128, 64)


def test_training_with_matryoshka_dims(tmp_path: Path) -> None:
    from tests.training.helpers import tiny_args, train

    result = train(tiny_args(tmp_path, "--matryoshka-dims", "64,32,16,8", steps=3))
    assert len(result["losses"]) == 3 and all(np.isfinite(result["losses"]))
    with pytest.raises(ConfigError, match="--matryoshka-dims entry 128: must be an integer between 1 and"):
        train(tiny_args(tmp_path / "bad", "--matryoshka-dims", "128,64", steps=1))


def test_extract_and_search_with_dim(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from cn_clip.eval.extract_features import main as extract_main
    from cn_clip.eval.featio import read_features
    from cn_clip.search.__main__ import main as search_main

    root = make_retrieval_dataset(tmp_path)
    ckpt = tiny_checkpoint(root / "ckpt.pt", seed=3)
    imgs = root / "lmdb" / "valid" / "imgs"
    (root / "q_texts.jsonl").write_text(json.dumps({"text_id": 1, "text": "一只猫"}, ensure_ascii=False) + "\n")
    common = ["--resume", str(ckpt), "--num-workers", "0", "--no-progress", "--device", "cpu"]
    argv = ["--extract-image-feats", "--extract-text-feats", "--image-data", str(imgs), "--precision", "fp32"]
    argv += ["--text-data", str(root / "q_texts.jsonl"), *common, *TINY_FLAGS]
    assert extract_main(argv) == 0
    full_images = read_features(root / "q_imgs.img_feat.jsonl", "image_id").matrix
    full_query = read_features(root / "q_texts.txt_feat.jsonl", "text_id").matrix
    assert extract_main([*argv, "--dim", "16"]) == 0
    images = read_features(root / "q_imgs.img_feat.jsonl", "image_id")
    query = read_features(root / "q_texts.txt_feat.jsonl", "text_id").matrix
    assert images.matrix.shape[1] == 16 and query.shape == (1, 16)
    expected = full_images[:, :16] / np.linalg.norm(full_images[:, :16], axis=1, keepdims=True)
    np.testing.assert_allclose(images.matrix, expected, atol=1e-5)
    np.testing.assert_allclose(query, full_query[:, :16] / np.linalg.norm(full_query[:, :16]), atol=1e-5)

    out = root / "idx16"
    assert search_main(["index", "--image-data", str(imgs), "--out", str(out), "--dim", "16", *common]) == 0
    assert json.loads((out / "meta.json").read_text())["dim"] == 16
    capsys.readouterr()
    assert search_main(["query", "--index", str(out), "一只猫", "--top-k", "3", "--json", "--device", "cpu"]) == 0
    hits = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    scores = images.matrix.astype(np.float64) @ query[0]
    order = np.argsort(-scores, kind="stable")[:3]
    assert [h["id"] for h in hits] == [images.ids[j] for j in order]
    np.testing.assert_allclose([h["score"] for h in hits], scores[order], atol=1e-5)
    assert search_main(["index", "--image-data", str(imgs), "--out", str(root / "bad"), "--dim", "65", *common]) == 2
    assert "--dim 65: must be an integer between 1 and the model's embed_dim 64" in capsys.readouterr().err
