"""extract_features: reference parity (golden RN50 outputs), ordering, formats, sharding, encoders, errors."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from cn_clip.eval import features as F
from cn_clip.eval.extract_features import default_output_paths, main
from cn_clip.eval.featio import read_features
from cn_clip.runtime import DistEnv
from tests.fixtures.fixture_weights import materialise
from tests.helpers import FIXTURES, TINY_ARCH, TINY_FLAGS, save_reference_checkpoint

GOLDEN = FIXTURES / "extract_zeroshot"


@pytest.fixture(scope="module")
def tiny(retrieval_data: Path, vit_ckpt: Path) -> dict[str, Path]:
    return {
        "imgs": retrieval_data / "lmdb" / "valid" / "imgs",
        "texts": retrieval_data / "valid_texts.jsonl",
        "ckpt": vit_ckpt,
    }


def _extract(tiny: dict[str, Path], out: Path, *extra: str) -> int:
    return main(
        [
            "--extract-image-feats", "--extract-text-feats",
            "--image-data", str(tiny["imgs"]), "--text-data", str(tiny["texts"]),
            "--image-feat-output-path", str(out / "img.jsonl"), "--text-feat-output-path", str(out / "txt.jsonl"),
            "--resume", str(tiny["ckpt"]), "--num-workers", "0", "--no-progress", *TINY_FLAGS, *extra,
        ]
    )  # fmt: skip


@pytest.mark.parity
def test_matches_reference_extract_features(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Same checkpoint, images and texts as the reference run of gen_extract_zeroshot_fixtures.py."""
    inputs = json.loads((GOLDEN / "inputs.json").read_text(encoding="utf-8"))
    paths = materialise(inputs, tmp_path / "data")
    ckpt = save_reference_checkpoint("RN50@RBT3-chinese", tmp_path / "ckpt.pt")
    argv = [
        "--extract-image-feats", "--extract-text-feats", "--image-data", str(paths["imgs"]),
        "--text-data", str(paths["texts"]), "--img-batch-size", "3", "--text-batch-size", "2",
        "--context-length", "24", "--resume", str(ckpt), "--precision", "fp32",
        "--vision-model", "RN50", "--text-model", "RBT3-chinese", "--num-workers", "0", "--no-progress",
    ]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    image_path, text_path = default_output_paths(str(paths["texts"]))
    assert image_path.endswith("valid_imgs.img_feat.jsonl") and text_path.endswith("valid_texts.txt_feat.jsonl")
    assert f"=> loaded checkpoint '{ckpt}' (epoch 1 @ 10 steps)" in out
    assert f"5 text features are stored in {text_path}" in out
    assert f"4 image features are stored in {image_path}" in out
    assert out.rstrip().endswith("Done!")
    golden = np.load(GOLDEN / "extract.npz")
    ids = json.loads((GOLDEN / "extract_ids.json").read_text())
    images, texts = read_features(image_path, "image_id"), read_features(text_path, "text_id")
    assert images.ids == ids["image_ids"] and texts.ids == ids["text_ids"]
    assert all(type(i) is int for i in images.ids + texts.ids)
    np.testing.assert_allclose(images.matrix, golden["image_features"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(texts.matrix, golden["text_features"], atol=1e-5, rtol=0)


def test_outputs_normalised_in_file_order(tiny: dict[str, Path], tmp_path: Path) -> None:
    assert _extract(tiny, tmp_path, "--text-batch-size", "4", "--precision", "fp32") == 0
    texts = read_features(tmp_path / "txt.jsonl", "text_id")
    images = read_features(tmp_path / "img.jsonl", "image_id")
    file_ids = [json.loads(line)["text_id"] for line in tiny["texts"].read_text().splitlines()]
    assert texts.ids == file_ids  # length grouping never changes the output order
    assert images.ids == sorted(images.ids, key=lambda i: str(i).encode())  # LMDB byte order
    np.testing.assert_allclose(np.linalg.norm(texts.matrix, axis=1), 1, atol=1e-6)
    # Batching by length (with padding trimmed per batch) equals encoding each text alone.
    from cn_clip.data.lmdb_dataset import JsonlTextDataset
    from cn_clip.models.factory import create_model

    model = create_model(TINY_ARCH, checkpoint=tiny["ckpt"])
    dataset = JsonlTextDataset(tiny["texts"])
    with torch.no_grad():
        alone = np.stack([F.l2_normalize(model.encode_text(dataset[i][1][None]))[0] for i in range(len(dataset))])
    np.testing.assert_allclose(texts.matrix, alone, atol=1e-5, rtol=0)


def test_npy_output_matches_jsonl(tiny: dict[str, Path], tmp_path: Path) -> None:
    assert _extract(tiny, tmp_path, "--precision", "fp32") == 0
    npy_argv = ["--image-feat-output-path", str(tmp_path / "img.npy"), "--text-feat-output-path"]
    assert _extract(tiny, tmp_path, "--output-format", "npy", *npy_argv, str(tmp_path / "txt.npy")) == 0
    for name, key in (("img", "image_id"), ("txt", "text_id")):
        a, b = read_features(tmp_path / f"{name}.jsonl", key), read_features(tmp_path / f"{name}.npy", key)
        assert a.ids == b.ids
        np.testing.assert_array_equal(a.matrix, b.matrix)


def test_default_paths_follow_the_reference() -> None:
    assert default_output_paths("d/valid_texts.jsonl") == (
        "d/valid_imgs.img_feat.jsonl",
        "d/valid_texts.txt_feat.jsonl",
    )
    assert default_output_paths("d/test_texts.jsonl", "npy") == (
        "d/test_imgs.img_feat.npy",
        "d/test_texts.txt_feat.npy",
    )


def test_shards_merge_back_in_order(tiny: dict[str, Path]) -> None:
    from cn_clip.data.lmdb_dataset import JsonlTextDataset
    from cn_clip.models.factory import create_model

    model = create_model(TINY_ARCH, checkpoint=tiny["ckpt"])
    dataset = JsonlTextDataset(tiny["texts"])
    batches = F.length_grouped_batches([len(t) for _, t in dataset.records], 3)
    encoder = F.TorchEncoder(model.encode_text, "cpu")
    whole = F.extract_features(encoder, F.make_loader(dataset, batches, 0), progress=False)
    parts = [
        F.extract_dataset(encoder, dataset, batches, env=DistEnv(rank=rank, world_size=3), progress=False)
        for rank in range(3)
    ]
    for rank, part in enumerate(parts):  # through the on-disk part format, as under torchrun
        path = Path(F.part_path(tiny["texts"], DistEnv(rank=rank, world_size=3)))
        F.save_part(part, path)
        parts[rank] = F.load_part(path)
        path.unlink()
    merged = F.merge_extracted(parts)
    assert merged.ids == [text_id for text_id, _ in dataset.records] == whole.ids
    np.testing.assert_array_equal(merged.matrix, whole.matrix)


def test_onnx_and_torch_encoders_are_interchangeable(tiny: dict[str, Path], tmp_path: Path) -> None:
    from cn_clip.data.lmdb_dataset import LMDBImageDataset
    from cn_clip.models.factory import create_model

    model = create_model(TINY_ARCH, checkpoint=tiny["ckpt"])

    class ImageTower(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, image: torch.Tensor) -> torch.Tensor:
            return self.model.encode_image(image)

    path = tmp_path / "img.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            ImageTower(),
            (torch.randn(1, 3, 64, 64),),
            str(path),
            input_names=["image"],
            output_names=["unnorm_image_features"],
            dynamo=False,
            opset_version=17,
        )  # fmt: skip  (no dynamic axes: batch 1, as the reference exports)
    dataset = LMDBImageDataset(tiny["imgs"], resolution=64)
    batches = F.sequential_batches(len(dataset), 5)
    by_torch = F.extract_features(F.TorchEncoder(model.encode_image, "cpu"), F.make_loader(dataset, batches, 0))
    by_onnx = F.extract_features(F.OnnxEncoder(path), F.make_loader(dataset, batches, 0), progress=False)
    assert by_onnx.ids == by_torch.ids
    np.testing.assert_allclose(by_onnx.matrix, by_torch.matrix, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "--extract-image-feats and --extract-text-feats cannot both be False!"),
        (["--extract-text-feats", "--resume", "/nonexistent.pt"], "The checkpoint file /nonexistent.pt not exists!"),
        (["--extract-text-feats", "--text-batch-size", "0"], "--text-batch-size must be positive"),
        (["--extract-text-feats", "--output-format", "npy", "--text-feat-output-path", "x.jsonl"], "ending in .npy"),
    ],
)
def test_user_errors_are_one_line(argv: list[str], message: str, capsys: pytest.CaptureFixture) -> None:
    assert main([*argv, *TINY_FLAGS]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1]


def test_missing_text_file_names_it(tiny: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    argv = ["--extract-text-feats", "--text-data", str(tmp_path / "nope_texts.jsonl"), "--resume", str(tiny["ckpt"])]
    assert main([*argv, *TINY_FLAGS, "--num-workers", "0"]) == 2
    assert "The annotation datafile" in capsys.readouterr().err


@pytest.mark.slow
def test_torchrun_two_processes_equal_one(tiny: dict[str, Path], tmp_path: Path) -> None:
    import os
    import subprocess

    args = [
        "--extract-image-feats", "--extract-text-feats", "--image-data", str(tiny["imgs"]),
        "--text-data", str(tiny["texts"]), "--resume", str(tiny["ckpt"]), "--num-workers", "0",
        "--text-batch-size", "3", "--img-batch-size", "5", "--device", "cpu", "--no-progress", *TINY_FLAGS,
    ]  # fmt: skip
    one = [*args, "--image-feat-output-path", str(tmp_path / "i1.jsonl"), "--text-feat-output-path"]
    assert main([*one, str(tmp_path / "t1.jsonl")]) == 0
    two = [*args, "--image-feat-output-path", str(tmp_path / "i2.jsonl"), "--text-feat-output-path"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([*cmd, "-m", "cn_clip.eval.extract_features", *two, str(tmp_path / "t2.jsonl")], check=True, env=env)
    for a, b, key in (("i1", "i2", "image_id"), ("t1", "t2", "text_id")):
        x, y = read_features(tmp_path / f"{a}.jsonl", key), read_features(tmp_path / f"{b}.jsonl", key)
        assert x.ids == y.ids
        np.testing.assert_allclose(x.matrix, y.matrix, atol=1e-6)
    assert not list(tmp_path.glob(".*part*"))
