"""One extraction chain: torch and ONNX encoders are interchangeable in extract_files, and ONNX inputs are trimmed
by the model's own padding helper."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cn_clip.deploy import onnx_export as O
from cn_clip.eval import features as F
from tests.helpers import make_retrieval_dataset

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, vit_model) -> dict[str, Path]:
    root = make_retrieval_dataset(tmp_path_factory.mktemp("data"))
    prefix = tmp_path_factory.mktemp("onnx") / "tiny"
    for kind in ("img", "txt"):
        O.export_encoder(vit_model, kind, prefix, precisions=("fp32",), check=False)
    return {"root": root, "img": O.onnx_path(prefix, "img", "fp32"), "txt": O.onnx_path(prefix, "txt", "fp32")}


def _jobs(text_encoder, image_encoder, root: Path, out: Path, resolution: int) -> list[F.FeatureJob]:
    return [
        F.FeatureJob("text", text_encoder, str(root / "valid_texts.jsonl"), str(out / "texts.jsonl")),
        F.FeatureJob("image", image_encoder, str(root / "lmdb/valid/imgs"), str(out / "imgs.npy"), resolution),
    ]


def test_torch_and_onnx_encoders_give_the_same_files(exported: dict[str, Path], vit_model, tmp_path: Path) -> None:
    from cn_clip.eval.featio import read_features

    resolution = vit_model.cfg.vision.image_resolution
    opts = F.ExtractOptions(img_batch_size=3, text_batch_size=4, progress=False)
    lines: list[str] = []
    torch_jobs = _jobs(
        F.TorchEncoder(vit_model.encode_text, "cpu"), F.TorchEncoder(vit_model.encode_image, "cpu"),
        exported["root"], tmp_path / "torch", resolution,
    )  # fmt: skip
    onnx_jobs = _jobs(
        F.OnnxEncoder(exported["txt"]), F.OnnxEncoder(exported["img"]), exported["root"], tmp_path / "onnx", resolution
    )
    by_torch = F.extract_files(torch_jobs, opts, announce=lines.append)
    by_onnx = F.extract_files(onnx_jobs, opts)
    assert lines[0] == "Make inference for texts..." and lines[-1] == "Done!"
    assert lines[1] == f"{len(by_torch['text'].ids)} text features are stored in {tmp_path / 'torch' / 'texts.jsonl'}"
    for kind, name in (("text", "texts.jsonl"), ("image", "imgs.npy")):
        assert by_onnx[kind].ids == by_torch[kind].ids
        np.testing.assert_allclose(by_onnx[kind].matrix, by_torch[kind].matrix, atol=1e-5, rtol=0)
        on_disk = read_features(tmp_path / "onnx" / name, f"{kind}_id")
        assert on_disk.ids == by_onnx[kind].ids


def test_onnx_text_inputs_are_trimmed_by_the_model_helper(exported: dict[str, Path]) -> None:
    from cn_clip.models.text import trim_padding

    encoder = F.OnnxEncoder(exported["txt"])
    tokens = torch.zeros(3, 52, dtype=torch.long)
    tokens[0, :5], tokens[1, :9], tokens[2, :2] = 7, 8, 9
    prepared = encoder.prepare(tokens)
    assert prepared.shape == (3, 9)
    np.testing.assert_array_equal(prepared, trim_padding(tokens).numpy())
    assert encoder.prepare(torch.zeros(2, 52, dtype=torch.long)).shape == (2, 1)


def test_unknown_job_kind_is_refused_before_any_work(tmp_path: Path) -> None:
    from cn_clip.errors import ConfigError

    job = F.FeatureJob("audio", lambda batch: batch, "x", str(tmp_path / "out.jsonl"))
    with pytest.raises(ConfigError, match="unknown feature job kind 'audio'"):
        F.extract_files([job], F.ExtractOptions(progress=False))
    assert not (tmp_path / "out.jsonl").exists()


def test_onnx_extractor_dim_equals_the_torch_extractor(
    exported: dict[str, Path], vit_ckpt: Path, tmp_path: Path
) -> None:
    """``extract_features_onnx --dim k`` cuts the graphs' full-width outputs as ``extract_features --dim k`` does."""
    from cn_clip.eval.extract_features import main as torch_main
    from cn_clip.eval.extract_features_onnx import main as onnx_main
    from cn_clip.eval.featio import read_features
    from tests.helpers import TINY_FLAGS

    root = exported["root"]
    data = ["--extract-image-feats", "--extract-text-feats", "--image-data", str(root / "lmdb/valid/imgs"),
            "--text-data", str(root / "valid_texts.jsonl"), "--num-workers", "0", "--no-progress", "--device", "cpu",
            "--dim", "16", *TINY_FLAGS]  # fmt: skip
    outputs = {}
    for name, main, extra in (
        ("torch", torch_main, ["--resume", str(vit_ckpt)]),
        ("onnx", onnx_main, ["--onnx-image-model", str(exported["img"]), "--onnx-text-model", str(exported["txt"])]),
    ):
        out = tmp_path / name
        paths = ["--image-feat-output-path", str(out / "i.jsonl"), "--text-feat-output-path", str(out / "t.jsonl")]
        assert main([*data, *extra, *paths]) == 0
        outputs[name] = [read_features(out / "i.jsonl", "image_id"), read_features(out / "t.jsonl", "text_id")]
    for by_torch, by_onnx in zip(outputs["torch"], outputs["onnx"], strict=True):
        assert by_onnx.ids == by_torch.ids and by_onnx.matrix.shape[1] == 16
        np.testing.assert_allclose(by_onnx.matrix, by_torch.matrix, atol=1e-5, rtol=0)
