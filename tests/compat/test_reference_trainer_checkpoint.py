"""A checkpoint written by the reference's own trainer (``epoch_latest.pt`` with its optimizer state, whose ``lr``
values are ``numpy.float64``) works everywhere ours does; NumPy globals that could run code stay refused.

The fixture comes from ``tests/fixtures/gen_reference_trainer_fixture.py`` (see ``tests/fixtures/README.md``).
"""

from __future__ import annotations

import hashlib
import json
import lzma
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from cn_clip.cli.runner import run_cli
from cn_clip.errors import CheckpointError
from tests.training.helpers import tiny_args, train

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "reference_trainer"
MANIFEST = json.loads((FIXTURE / "manifest.json").read_text())
MARKER = Path("/tmp/cn_clip_numpy_pickle_ran")


@pytest.fixture(scope="module")
def ref_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference's file, byte for byte (it is stored xz-compressed)."""
    path = tmp_path_factory.mktemp("reference_trainer") / "epoch_latest.pt"
    path.write_bytes(lzma.decompress((FIXTURE / "epoch_latest.pt.xz").read_bytes()))
    return path


def test_fixture_is_the_reference_file_with_numpy_scalars(ref_ckpt: Path) -> None:
    from cn_clip.weights import read_checkpoint

    assert hashlib.sha256(ref_ckpt.read_bytes()).hexdigest() == MANIFEST["sha256"]
    assert "numpy._core.multiarray.scalar" in MANIFEST["numpy_globals"]
    with pytest.raises(pickle.UnpicklingError, match="numpy"):  # what every loader hit before the allow-list
        torch.load(ref_ckpt, map_location="cpu", weights_only=True)
    ckpt = read_checkpoint(ref_ckpt)
    lrs = [group["lr"] for group in ckpt["optimizer"]["param_groups"]]
    assert [type(lr) for lr in lrs] == [np.float64, np.float64] and lrs == [pytest.approx(1e-3)] * 2
    assert (ckpt["epoch"], ckpt["step"]) == (MANIFEST["epoch"], MANIFEST["step"]) == (1, 1)


def test_load_from_name_reads_its_weights(ref_ckpt: Path) -> None:
    from cn_clip.models.factory import load_from_name
    from cn_clip.weights import read_checkpoint

    model, _ = load_from_name(str(ref_ckpt), device="cpu")
    assert model.cfg.name == MANIFEST["architecture"]
    saved = read_checkpoint(ref_ckpt)["state_dict"]
    ours = model.state_dict()
    for key in ("text_projection", "visual.proj", "bert.embeddings.word_embeddings.weight"):
        assert torch.equal(ours[key], saved[f"module.{key}"])


def _run(module_name: str, args: list[str]) -> int:
    import importlib

    try:
        return run_cli(importlib.import_module(module_name).main, args)
    except SystemExit as exc:  # an entry point whose main already wraps run_cli
        return exc.code


def test_extract_features_reads_it(ref_ckpt: Path, tmp_path: Path) -> None:
    texts = tmp_path / "valid_texts.jsonl"
    texts.write_text('{"text_id": 1, "text": "一只猫"}\n{"text_id": 2, "text": "山水画"}\n', encoding="utf-8")
    args = ["--extract-text-feats", "--text-data", str(texts), "--resume", str(ref_ckpt), "--context-length", "16"]
    args += ["--vision-model", "ViT-Tiny", "--text-model", "BERT-Tiny-chinese", "--num-workers", "0"]
    assert _run("cn_clip.eval.extract_features", args) == 0
    rows = [json.loads(line) for line in (tmp_path / "valid_texts.txt_feat.jsonl").read_text().splitlines()]
    assert [row["text_id"] for row in rows] == [1, 2] and len(rows[0]["feature"]) == 64


def test_convert_reads_it(ref_ckpt: Path, tmp_path: Path) -> None:
    assert _run("cn_clip.convert", ["to-hf", str(ref_ckpt), str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "config.json").is_file()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_onnx_export_reads_it(ref_ckpt: Path, tmp_path: Path) -> None:
    prefix = tmp_path / "m"
    args = ["--model-arch", MANIFEST["architecture"], "--pytorch-ckpt-path", str(ref_ckpt)]
    assert _run("cn_clip.deploy.pytorch_to_onnx", [*args, "--save-onnx-path", str(prefix), "--convert-text"]) == 0
    assert list(tmp_path.glob("m*.onnx"))


def _adam_steps(ckpt: dict) -> set[float]:
    return {float(state["step"]) for state in ckpt["optimizer"]["state"].values()}


def test_training_resumes_it_with_its_optimizer_state(ref_ckpt: Path, tmp_path: Path) -> None:
    from cn_clip.weights import read_checkpoint

    assert _adam_steps(read_checkpoint(ref_ckpt)) == {1.0}
    # The reference run froze the image tower, so its two parameter groups hold the text tower only; one epoch
    # of synthetic:16:4 is 4 steps, so --max-steps 5 trains exactly one step after the resumed epoch.
    train(tiny_args(tmp_path, "--resume", str(ref_ckpt), "--freeze-vision", "--warmup", "0", steps=5))
    latest = read_checkpoint(tmp_path / "run" / "checkpoints" / "epoch_latest.pt")
    assert _adam_steps(latest) == {2.0}  # Adam continued from the reference's step count
    assert [len(g["params"]) for g in latest["optimizer"]["param_groups"]] == MANIFEST["param_group_sizes"]


def test_training_refuses_its_optimizer_state_when_groups_differ(ref_ckpt: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="optimizer state does not fit"):
        train(tiny_args(tmp_path, "--resume", str(ref_ckpt), steps=5))  # image tower trainable: other groups


class _Runstring:
    """A NumPy function that executes a string: the allow-list must not let it through."""

    def __reduce__(self):
        from numpy.testing._private.utils import runstring

        return (runstring, (f"open({str(MARKER)!r}, 'w').close()", {}))


class _ObjectScalar:
    """``numpy scalar(dtype('O'), obj)`` would hand back an arbitrary object: refused by the dtype check."""

    def __reduce__(self):
        return (np._core.multiarray.scalar, (np.dtype("O"), "payload"))


@pytest.mark.parametrize(
    "payload",
    [_Runstring(), _ObjectScalar(), np.arange(3), np.array([b"abc"]), np.datetime64("2024-01-01")],
    ids=["runstring", "object_scalar", "ndarray", "bytes_array", "datetime64"],
)
def test_numpy_globals_beyond_numeric_scalars_are_refused(tmp_path: Path, payload: object) -> None:
    from cn_clip.models.factory import load_from_name

    MARKER.unlink(missing_ok=True)
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"module.logit_scale": torch.tensor(1.0)}, "optimizer": {"x": payload}}, path)
    with pytest.raises(CheckpointError, match="refused to unpickle"):
        load_from_name(str(path), device="cpu")
    assert not MARKER.exists(), "a checkpoint loader executed pickled code"


@pytest.mark.parametrize("value", [np.float64(0.25), np.float32(-1.5), np.int64(7), np.bool_(True), np.complex64(1j)])
def test_numeric_numpy_scalars_round_trip(tmp_path: Path, value: np.generic) -> None:
    from cn_clip.weights import read_checkpoint

    path = tmp_path / "scalar.pt"
    torch.save({"lr": value, "big_endian": np.dtype(">f8").type(3.0)}, path)
    loaded = read_checkpoint(path)
    assert type(loaded["lr"]) is type(value) and loaded["lr"] == value
    assert loaded["big_endian"] == 3.0


def test_numpy_dtype_state_does_not_leak_into_numpy(tmp_path: Path) -> None:
    from cn_clip.weights import read_checkpoint

    path = tmp_path / "dtype.pt"
    torch.save({"d": np.dtype(">f8")}, path)
    assert read_checkpoint(path)["d"] == np.dtype(">f8")
    assert np.dtype("f8").byteorder == "=" and np.zeros(1).dtype.isnative


def test_numpy1_scalar_name_is_read(tmp_path: Path) -> None:
    """Files written under NumPy 1 name ``numpy.core.multiarray.scalar``: same function, older module path."""
    import zipfile

    from cn_clip.weights import read_checkpoint

    written = tmp_path / "numpy2.pt"
    torch.save({"lr": np.float64(0.5)}, written)
    path = tmp_path / "numpy1.pt"
    with zipfile.ZipFile(written) as src, zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as dst:
        for name in src.namelist():
            data = src.read(name)
            if name.endswith("data.pkl"):
                assert b"numpy._core.multiarray\nscalar" in data
                data = data.replace(b"numpy._core.multiarray\nscalar", b"numpy.core.multiarray\nscalar")
            dst.writestr(name, data)
    loaded = read_checkpoint(path)["lr"]
    assert type(loaded) is np.float64 and loaded == 0.5
