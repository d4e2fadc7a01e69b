"""Long captions: --context-length up to the text tower's position limit in training, evaluation, search and ONNX
export; beyond it a clear error, or interpolated positions with --interpolate-positions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cn_clip.errors import ConfigError
from cn_clip.models.positions import check_context_length, interpolate_positions, position_limit
from tests.helpers import TINY_FLAGS, make_retrieval_dataset

LONG = "一只橘色的猫在窗台上晒太阳，旁边放着一盆绿色的植物和一本翻开的书。"  # 33 characters


def _long_texts(root: Path, n: int = 14, repeat: int = 12) -> Path:
    """Replace the fixture's captions with ~400-character ones, so that 52, 128 and 512 tokens all differ."""
    path = root / "valid_texts.jsonl"
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    for i, record in enumerate(records[:n]):
        record["text"] = f"第{i}张：" + LONG * repeat
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return root


def test_limit_error_and_interpolation(tiny_model) -> None:
    assert position_limit(tiny_model) == 512
    assert check_context_length(tiny_model, 512) == 512
    with pytest.raises(ConfigError, match="--context-length 513 exceeds the text tower's position limit 512; use at"):
        check_context_length(tiny_model, 513)
    tiny_model.eval()
    text = torch.tensor([[101, 4344, 2769, 102, 0]])
    before = tiny_model.encode_text(text).detach()
    old = tiny_model.bert.embeddings.position_embeddings.weight.detach().clone()
    assert check_context_length(tiny_model, 1023, interpolate=True) == 1023
    new = tiny_model.bert.embeddings.position_embeddings.weight.detach()
    assert position_limit(tiny_model) == 1023 and new.shape == (1023, 64)
    torch.testing.assert_close(new[0], old[0])  # ends aligned; every other old row lands on an even new row
    torch.testing.assert_close(new[-1], old[-1])
    torch.testing.assert_close(new[2 * 7], old[7])
    torch.testing.assert_close(new[1], (old[0] + old[1]) / 2)
    assert not torch.allclose(tiny_model.encode_text(text).detach(), before)  # positions 1..3 moved
    long = torch.randint(106, 21128, (2, 1000))
    long[:, 0], long[:, -1] = 101, 102
    assert tiny_model.encode_text(long).shape == (2, 64)


def test_interpolating_to_the_same_length_is_identity(tiny_model) -> None:
    tiny_model.eval()
    text = torch.tensor([[101, 4344, 2769, 102]])
    before = tiny_model.encode_text(text).detach()
    interpolate_positions(tiny_model, 512)
    torch.testing.assert_close(tiny_model.encode_text(text).detach(), before)


@pytest.mark.parametrize("length", [128, 512])
def test_train_and_evaluate_long_context(tmp_path: Path, length: int, capsys: pytest.CaptureFixture) -> None:
    from cn_clip.eval.run import main as run_main
    from tests.training.helpers import tiny_args, train

    argv = tiny_args(tmp_path, "--context-length", str(length), "--val-data", "synthetic:8:4", steps=2)
    result = train(argv)
    assert len(result["losses"]) == 2 and result["validation"]["mean_recall"] >= 0
    ckpt = tmp_path / "run" / "checkpoints" / "epoch_latest.pt"
    root = _long_texts(make_retrieval_dataset(tmp_path / "data"))
    out = tmp_path / "eval"
    common = ["--data", str(root), "--split", "valid", "--resume", str(ckpt), "--num-workers", "0", "--no-progress"]
    assert run_main([*common, "--output-dir", str(out), "--context-length", str(length), *TINY_FLAGS]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_texts"] == 14 and 0 <= summary["results"]["text_to_image"]["recall"]["r10"] <= 100
    short = tmp_path / "eval52"
    assert run_main([*common, "--output-dir", str(short), *TINY_FLAGS]) == 0
    long_feats = (out / "valid_texts.txt_feat.jsonl").read_text()
    assert long_feats != (short / "valid_texts.txt_feat.jsonl").read_text()  # the extra tokens were read


def test_beyond_the_limit_training_eval_search(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from cn_clip.cli.runner import run_cli
    from cn_clip.eval.extract_features import main as extract_main
    from cn_clip.search.__main__ import main as search_main
    from cn_clip.training.main import main as train_main
    from tests.training.helpers import tiny_args, train

    assert run_cli(train_main, tiny_args(tmp_path / "refused", "--context-length", "600", steps=1)) == 2
    err = capsys.readouterr().err
    assert "--context-length 600 exceeds the text tower's position limit 512" in err
    assert "--interpolate-positions" in err and "Traceback" not in err

    train(tiny_args(tmp_path, "--context-length", "600", "--interpolate-positions", steps=2))
    ckpt = tmp_path / "run" / "checkpoints" / "epoch_latest.pt"
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    assert state["module.bert.embeddings.position_embeddings.weight"].shape == (600, 64)
    # the checkpoint carries 600 positions: loading it needs no flag, and training resumes from it
    train(tiny_args(tmp_path, "--context-length", "600", "--resume", str(ckpt), steps=3))

    root = _long_texts(make_retrieval_dataset(tmp_path / "data"), repeat=20)
    imgs = root / "lmdb" / "valid" / "imgs"
    base = ["--extract-text-feats", "--text-data", str(root / "valid_texts.jsonl"), "--resume", str(ckpt)]
    base += ["--num-workers", "0", "--no-progress", "--device", "cpu", *TINY_FLAGS]
    assert extract_main([*base, "--context-length", "600"]) == 0
    assert extract_main([*base, "--context-length", "700"]) == 2
    assert "--context-length 700 exceeds the text tower's position limit 600" in capsys.readouterr().err
    assert extract_main([*base, "--context-length", "700", "--interpolate-positions"]) == 0

    idx = tmp_path / "idx"
    common = ["--resume", str(ckpt), "--num-workers", "0", "--no-progress", "--device", "cpu"]
    argv = ["index", "--image-data", str(imgs), "--out", str(idx), "--context-length", "700"]
    assert search_main([*argv, "--interpolate-positions", *common]) == 0
    capsys.readouterr()
    assert search_main(["query", "--index", str(idx), LONG * 20, "--json", "--device", "cpu"]) == 0
    assert len(json.loads(capsys.readouterr().out.strip().splitlines()[-1])) == 5


def test_onnx_export_long_context(tmp_path: Path, tiny_model) -> None:
    from cn_clip.deploy import onnx_export as O

    tiny_model.eval()
    interpolate_positions(tiny_model, 600)
    result = O.export_encoder(tiny_model, "txt", tmp_path / "m", precisions=("fp32",), context_length=128)
    assert all(report.ok for report in result.reports)
    session = O.create_session(result.paths["fp32"])
    for length in (52, 512, 600):  # the sequence axis is dynamic: one graph for every length up to the limit
        text = torch.randint(106, 21128, (2, length))
        text[:, 0], text[:, -1] = 101, 102
        np.testing.assert_allclose(
            O.run_session(session, text.numpy()), tiny_model.encode_text(text).detach().numpy(), atol=1e-5
        )


def test_encode_text_names_the_limit(tiny_model) -> None:
    from cn_clip.tokenizer import tokenize

    assert tiny_model.encode_text(tokenize("短", context_length=600)).shape == (1, 64)  # padding is trimmed first
    with pytest.raises(ValueError, match="length 600 exceed the text tower's position limit 512"):
        tiny_model.encode_text(tokenize("长" * 700, context_length=600))
