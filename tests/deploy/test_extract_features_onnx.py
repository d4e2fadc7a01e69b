"""extract_features_onnx: same files and (within float tolerance) same features as the PyTorch extractor."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cn_clip.deploy import onnx_export as O
from cn_clip.eval.extract_features_onnx import main
from cn_clip.eval.featio import read_features
from tests.helpers import TINY_FLAGS

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, vit_model, vit_ckpt: Path, retrieval_data: Path) -> dict[str, Path]:
    root = retrieval_data
    prefix = tmp_path_factory.mktemp("onnx") / "tiny"
    for kind in ("img", "txt"):
        O.export_encoder(vit_model, kind, prefix, precisions=("fp32",), check=False)
    return {"root": root, "prefix": prefix, "ckpt": vit_ckpt}


def _data_flags(root: Path, out: Path) -> list[str]:
    return [
        "--image-data",
        str(root / "lmdb" / "valid" / "imgs"),
        "--text-data",
        str(root / "valid_texts.jsonl"),
        "--image-feat-output-path",
        str(out / "imgs.img_feat.jsonl"),
        "--text-feat-output-path",
        str(out / "texts.txt_feat.jsonl"),
        *TINY_FLAGS,
    ]


@pytest.mark.parametrize("batch", ["1", "5"])
def test_onnx_features_match_pytorch_extractor(setup: dict[str, Path], tmp_path: Path, batch: str, capsys) -> None:
    from cn_clip.eval.extract_features import main as torch_main

    both = ["--extract-image-feats", "--extract-text-feats"]
    torch_out, onnx_out = tmp_path / "torch", tmp_path / "onnx"
    assert torch_main([*both, *_data_flags(setup["root"], torch_out), "--resume", str(setup["ckpt"])]) == 0
    onnx_flags = [
        "--onnx-image-model",
        str(O.onnx_path(setup["prefix"], "img", "fp32")),
        "--onnx-text-model",
        str(O.onnx_path(setup["prefix"], "txt", "fp32")),
        "--device",
        "cpu",
        "--img-batch-size",
        batch,
        "--text-batch-size",
        batch,
    ]
    assert main([*both, *_data_flags(setup["root"], onnx_out), *onnx_flags]) == 0
    stdout = capsys.readouterr().out
    assert "12 image features are stored in" in stdout and "14 text features are stored in" in stdout
    for name, key in (("imgs.img_feat.jsonl", "image_id"), ("texts.txt_feat.jsonl", "text_id")):
        want, got = read_features(torch_out / name, key), read_features(onnx_out / name, key)
        assert got.ids == want.ids
        np.testing.assert_allclose(got.matrix, want.matrix, atol=1e-5, rtol=0)
        np.testing.assert_allclose(np.linalg.norm(got.matrix, axis=1), 1.0, atol=1e-6)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "cannot both be False"),
        (["--extract-text-feats"], "--onnx-text-model is required"),
        (["--extract-image-feats", "--onnx-image-model", "/missing.onnx"], "/missing.onnx does not exist"),
    ],
)
def test_errors_are_one_line(argv: list[str], message: str, capsys) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1]
