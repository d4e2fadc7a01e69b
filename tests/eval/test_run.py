"""One-command evaluation: its files equal the reference-format manual steps run on the same features."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cn_clip.eval.featio import read_features
from cn_clip.eval.run import main
from tests.helpers import TINY_FLAGS, make_retrieval_dataset


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory: pytest.TempPathFactory, vit_ckpt: Path) -> dict:
    root = make_retrieval_dataset(tmp_path_factory.mktemp("ds"), n_images=12, n_texts=16)
    ckpt = vit_ckpt
    out = root / "out"
    argv = ["--data", str(root), "--split", "valid", "--resume", str(ckpt), "--output-dir", str(out)]
    code = main([*argv, "--num-workers", "0", "--no-progress", "--device", "cpu", *TINY_FLAGS])
    return {"root": root, "out": out, "code": code, "ckpt": ckpt}


def test_files_equal_the_manual_pipeline(evaluated: dict, tmp_path: Path) -> None:
    from cn_clip.eval.evaluation import main as evaluation_main
    from cn_clip.eval.make_topk_predictions import main as topk_main
    from cn_clip.eval.transform_ir_annotation_to_tr import main as transform_main

    assert evaluated["code"] == 0
    out, root = evaluated["out"], evaluated["root"]
    images, texts = out / "valid_imgs.img_feat.jsonl", out / "valid_texts.txt_feat.jsonl"
    feats = ["--image-feats", str(images), "--text-feats", str(texts)]
    assert topk_main([*feats, "--output", str(tmp_path / "p.jsonl")]) == 0
    assert topk_main([*feats, "--output", str(tmp_path / "p_tr.jsonl")], direction="image_to_text") == 0
    assert (tmp_path / "p.jsonl").read_bytes() == (out / "valid_predictions.jsonl").read_bytes()
    assert (tmp_path / "p_tr.jsonl").read_bytes() == (out / "valid_tr_predictions.jsonl").read_bytes()
    (tmp_path / "valid_texts.jsonl").write_bytes((root / "valid_texts.jsonl").read_bytes())
    assert transform_main(["--input", str(tmp_path / "valid_texts.jsonl")]) == 0
    assert (tmp_path / "valid_texts.tr.jsonl").read_bytes() == (out / "valid_texts.tr.jsonl").read_bytes()
    evaluation_main([str(root / "valid_texts.jsonl"), str(tmp_path / "p.jsonl"), str(tmp_path / "o.json")])
    evaluation_main(
        [str(out / "valid_texts.tr.jsonl"), str(tmp_path / "p_tr.jsonl"), str(tmp_path / "o_tr.json")],
        direction="image_to_text",
    )
    assert (tmp_path / "o.json").read_bytes() == (out / "output.json").read_bytes()
    assert (tmp_path / "o_tr.json").read_bytes() == (out / "output_tr.json").read_bytes()
    assert json.loads((out / "output.json").read_text())["success"] is True


def test_table_matches_brute_force_recall(evaluated: dict, capsys: pytest.CaptureFixture) -> None:
    out, root = evaluated["out"], evaluated["root"]
    images = read_features(out / "valid_imgs.img_feat.jsonl", "image_id")
    texts = read_features(out / "valid_texts.txt_feat.jsonl", "text_id")
    truth = {}
    for line in (root / "valid_texts.jsonl").read_text().splitlines():
        obj = json.loads(line)
        truth[obj["text_id"]] = obj["image_ids"]
    scores = texts.matrix.astype(np.float64) @ images.matrix.T.astype(np.float64)
    expected = {}
    for k in (1, 5, 10):
        hits = 0
        for row, text_id in zip(scores, texts.ids, strict=True):
            ranked = [images.ids[j] for j in sorted(range(len(row)), key=lambda j: -row[j])[:k]]
            hits += any(i in ranked for i in truth[text_id])
        expected[f"r{k}"] = 100 * hits / len(truth)
    summary = json.loads((out / "summary.json").read_text())
    recall = summary["results"]["text_to_image"]["recall"]
    assert {k: recall[k] for k in expected} == pytest.approx(expected)
    assert summary["results"]["image_to_text"]["scored"] and summary["num_images"] == 12
    score = json.loads((out / "output.json").read_text())["scoreJson"]
    assert score["r1"] == pytest.approx(recall["r1"]) and score["mean_recall"] == pytest.approx(recall["mean_recall"])


def test_console_table_and_no_ground_truth(tmp_path: Path, capsys: pytest.CaptureFixture, evaluated: dict) -> None:
    root = make_retrieval_dataset(tmp_path / "ds", split="test", n_images=11, n_texts=10)
    lines = [json.loads(line) for line in (root / "test_texts.jsonl").read_text().splitlines()]
    (root / "test_texts.jsonl").write_text("".join(json.dumps({**o, "image_ids": []}) + "\n" for o in lines))
    argv = ["--data", str(root), "--split", "test", "--resume", str(evaluated["ckpt"]), "--num-workers", "0"]
    assert main([*argv, "--no-progress", "--device", "cpu", *TINY_FLAGS]) == 0
    out = capsys.readouterr().out
    assert "direction" in out and "R@10" in out and "no ground truth in this split" in out
    assert (root / "eval" / "test" / "test_predictions.jsonl").is_file()
    assert not (root / "eval" / "test" / "output.json").exists()


def test_missing_split_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["--data", str(tmp_path), "--split", "valid", "--resume", "x.pt", *TINY_FLAGS]) == 2
    assert "The annotation datafile" in capsys.readouterr().err
