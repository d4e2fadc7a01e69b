"""speed_benchmark prints the reference's fields for every engine; timing helpers; optional back ends fail clearly."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from cn_clip.deploy import onnx_export as O
from cn_clip.deploy.benchmark import TimingStats, time_calls
from cn_clip.deploy.speed_benchmark import main
from tests.helpers import TINY_ARCH

LINE = re.compile(
    r"^\[(?P<name>.+)\] mean=\d+\.\d\dms, sd=\d+\.\d\dms, min=\d+\.\d\dms, max=\d+\.\d\dms, "
    r"median=\d+\.\d\dms, 95p=\d+\.\d\dms, 99p=\d+\.\d\dms$"
)


def test_timing_stats_line_and_throughput() -> None:
    stats = TimingStats.of("x", [0.010, 0.020, 0.030], items_per_call=4)
    assert stats.median == pytest.approx(20.0) and stats.items_per_second == pytest.approx(200.0)
    assert LINE.match(stats.line())
    calls = []
    assert len(time_calls(lambda: calls.append(1), n=3, warmup=2)) == 3 and len(calls) == 5


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_cpu_run_covers_pytorch_and_onnx(tmp_path: Path, vit_ckpt: Path, vit_model, capsys) -> None:
    for kind in ("img", "txt"):
        O.export_encoder(vit_model, kind, tmp_path / "m", precisions=("fp32", "int8"), check=False)
    argv = ["--model-arch", TINY_ARCH, "--pytorch-ckpt", str(vit_ckpt), "--device", "cpu", "--n", "2"]
    argv += ["--warmup", "1", "--batch-size", "1", "3", "--pytorch-precision", "fp32", "bf16", "--threads", "1"]
    argv += ["--onnx-image-model", *(str(O.onnx_path(tmp_path / "m", "img", p)) for p in ("fp32", "int8"))]
    argv += ["--onnx-text-model", str(O.onnx_path(tmp_path / "m", "txt", "fp32"))]
    assert main(argv) == 0
    names = [m.group("name") for line in capsys.readouterr().out.splitlines() if (m := LINE.match(line))]
    for batch in (1, 3):
        assert f"Image preprocessing (batch-size: {batch}):" in names
        assert f"Text tokenization (batch-size: {batch}):" in names
        assert f"Pytorch bf16 image inference speed (batch-size: {batch}):" in names
        assert f"ONNX m.img.int8.onnx image inference speed (batch-size: {batch}):" in names
        assert f"ONNX text inference speed (batch-size: {batch}):" in names
    assert len(names) == 2 * (2 + 2 + 2 + 2 + 1)


def test_cuda_without_a_gpu_is_a_clear_error(capsys, monkeypatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["--model-arch", TINY_ARCH, "--device", "cuda"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("module", "argv", "message"),
    [
        ("cn_clip.deploy.onnx_to_tensorrt", ["--save-tensorrt-path", "x", "--convert-text"], "Error: The specified"),
        ("cn_clip.deploy.pytorch_to_coreml", ["--save-coreml-path", "x"], "nothing to convert"),
    ],
)
def test_optional_backends_fail_clearly(module: str, argv: list[str], message: str, capsys) -> None:
    import importlib

    entry = importlib.import_module(module).main
    assert entry(["--model-arch", TINY_ARCH, *argv]) == 2
    assert message in capsys.readouterr().err


def test_tensorrt_missing_is_explained(monkeypatch) -> None:
    from cn_clip.deploy.onnx_to_tensorrt import import_tensorrt
    from cn_clip.errors import ConfigError

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(ConfigError, match="pip install tensorrt"):
        import_tensorrt()
