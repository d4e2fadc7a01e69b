"""ONNX export: reference names, dynamic batch and sequence axes, parity, fp16/int8, relocatable external data."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from cn_clip.deploy import onnx_export as O
from cn_clip.deploy.pytorch_to_onnx import main
from tests.helpers import RN_TINY_ARCH, TINY_ARCH

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture(scope="module")
def vit_files(tmp_path_factory: pytest.TempPathFactory, vit_ckpt: Path) -> Path:
    prefix = tmp_path_factory.mktemp("onnx") / "vit"
    argv = ["--model-arch", TINY_ARCH, "--pytorch-ckpt-path", str(vit_ckpt), "--save-onnx-path", str(prefix)]
    assert main([*argv, "--convert-text", "--convert-vision", "--int8"]) == 0
    return prefix


def _text_batch(batch: int, length: int, seed: int) -> torch.Tensor:
    """Token ids with [CLS] … [SEP] and per-row padding, including one row without any padding."""
    gen = torch.Generator().manual_seed(seed)
    text = torch.zeros(batch, length, dtype=torch.long)
    for row in range(batch):
        used = length if row == 0 else int(torch.randint(3, length, (1,), generator=gen))
        text[row, :used] = torch.randint(106, 21128, (used,), generator=gen)
        text[row, 0], text[row, used - 1] = 101, 102
    return text


def test_reference_file_and_tensor_names(vit_files: Path, capsys: pytest.CaptureFixture) -> None:
    for kind, (input_name, output_name) in O.ENCODER_IO.items():
        for precision in ("fp32", "fp16", "int8"):
            path = O.onnx_path(vit_files, kind, precision)
            assert path.is_file(), path
            session = O.create_session(path)
            assert [i.name for i in session.get_inputs()] == [input_name]
            assert [o.name for o in session.get_outputs()] == [output_name]
            shape = session.get_inputs()[0].shape
            assert isinstance(shape[0], str), f"{path.name}: batch axis is fixed ({shape})"
            if kind == "txt":
                assert isinstance(shape[1], str), f"{path.name}: sequence axis is fixed ({shape})"
    assert not list(vit_files.parent.glob(".onnx-export*")), "staging directory left behind"


@pytest.mark.parametrize(("batch", "length"), [(1, 10), (7, 10), (1, 52), (7, 52)])
def test_text_graph_dynamic_axes_match_pytorch(vit_files: Path, vit_model, batch: int, length: int) -> None:
    session = O.create_session(O.onnx_path(vit_files, "txt", "fp32"))  # the same graph for every shape
    text = _text_batch(batch, length, seed=batch * 100 + length)
    got = O.run_session(session, text.numpy())
    want = vit_model.encode_text(text).detach().numpy()  # PyTorch trims padding; the graph masks it
    assert got.shape == (batch, 64)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    assert _cosine(got, want).min() >= O.MIN_COSINE["fp32"]


def test_text_padding_does_not_change_features(vit_files: Path) -> None:
    session = O.create_session(O.onnx_path(vit_files, "txt", "fp32"))
    short = _text_batch(3, 10, seed=1)
    padded = torch.nn.functional.pad(short, (0, 42))
    np.testing.assert_allclose(
        O.run_session(session, short.numpy()), O.run_session(session, padded.numpy()), atol=1e-6, rtol=0
    )


@pytest.mark.parametrize("batch", [1, 7])
def test_image_graph_dynamic_batch_matches_pytorch(vit_files: Path, vit_model, batch: int) -> None:
    session = O.create_session(O.onnx_path(vit_files, "img", "fp32"))
    image = torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(batch))
    got = O.run_session(session, image.numpy())
    np.testing.assert_allclose(got, vit_model.encode_image(image).detach().numpy(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_reduced_precision_variants_run_within_threshold(vit_files: Path, vit_model, precision: str) -> None:
    text = _text_batch(7, 52, seed=3)
    image = torch.randn(7, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    for kind, inputs, want in (
        ("txt", text, vit_model.encode_text(text)),
        ("img", image, vit_model.encode_image(image)),
    ):
        session = O.create_session(O.onnx_path(vit_files, kind, precision))
        got = O.run_session(session, inputs.numpy())
        assert got.dtype == np.float32  # fp32 I/O for every variant
        assert _cosine(got, want.detach().numpy()).min() >= O.MIN_COSINE[precision]


def test_resnet_export_dynamic_batch(tmp_path: Path, rn_ckpt: Path, rn_model) -> None:
    prefix = tmp_path / "rn"
    argv = ["--model-arch", RN_TINY_ARCH, "--pytorch-ckpt-path", str(rn_ckpt), "--save-onnx-path", str(prefix)]
    assert main([*argv, "--convert-vision", "--convert-text", "--no-fp16"]) == 0
    image_session = O.create_session(O.onnx_path(prefix, "img", "fp32"))
    text_session = O.create_session(O.onnx_path(prefix, "txt", "fp32"))
    for batch in (1, 7):
        image = torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(batch))
        want = rn_model.encode_image(image).detach().numpy()
        np.testing.assert_allclose(O.run_session(image_session, image.numpy()), want, atol=1e-5, rtol=0)
        for length in (10, 52):
            text = _text_batch(batch, length, seed=length)
            want = rn_model.encode_text(text).detach().numpy()
            np.testing.assert_allclose(O.run_session(text_session, text.numpy()), want, atol=1e-5, rtol=0)


def test_external_data_is_one_relocatable_file(tmp_path: Path, vit_model) -> None:
    result = O.export_encoder(vit_model, "img", tmp_path / "a" / "m", precisions=("fp32", "fp16"), external_data=True)
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    image = torch.randn(2, 3, 64, 64)
    for precision, path in result.paths.items():
        extra = path.parent / O.external_data_name(path)
        assert extra.is_file() and path.stat().st_size < 100_000, "weights must live in the one external file"
        assert sorted(p.name for p in path.parent.iterdir() if p.name.startswith(path.name)) == [
            path.name,
            extra.name,
        ]
        shutil.move(path, moved / path.name)
        shutil.move(extra, moved / extra.name)
        got = O.run_session(O.create_session(moved / path.name), image.numpy())
        want = vit_model.encode_image(image).detach().numpy()
        assert _cosine(got, want).min() >= O.MIN_COSINE[precision]
    assert not list((tmp_path / "a").iterdir())


def test_failed_parity_writes_nothing(tmp_path: Path, vit_ckpt: Path, monkeypatch, capsys) -> None:
    monkeypatch.setitem(O.MIN_COSINE, "fp32", 1.5)
    prefix = tmp_path / "bad"
    argv = ["--model-arch", TINY_ARCH, "--pytorch-ckpt-path", str(vit_ckpt), "--save-onnx-path", str(prefix)]
    assert main([*argv, "--convert-vision", "--no-fp16"]) == 2
    assert "FAILED" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "nothing to convert"),
        (["--convert-text", "--pytorch-ckpt-path", "/nonexistent.pt"], "/nonexistent.pt does not exist"),
        (["--convert-text"], "has no released weights"),
    ],
)
def test_cli_errors_are_one_line(tmp_path: Path, capsys, extra: list[str], message: str) -> None:
    assert main(["--model-arch", TINY_ARCH, "--save-onnx-path", str(tmp_path / "x"), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_parity_report_flags_nan() -> None:
    report = O.compare("x", np.ones((2, 3)), np.full((2, 3), np.nan), 0.99)
    assert not report.ok and "FAILED" in str(report)
