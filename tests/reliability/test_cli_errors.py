"""Malformed input to every command-line entry point: one clear line on stderr, non-zero exit, no traceback."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.helpers import TINY_ARCH, TINY_FLAGS

pytestmark = pytest.mark.reliability

GARBAGE = "this is {not json\n"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, vit_ckpt: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli")
    raw = root / "raw"
    raw.mkdir()
    (raw / "train_imgs.tsv").write_text("1\tnot-base64!!\n2\n", encoding="utf-8")
    (raw / "train_texts.jsonl").write_text(GARBAGE, encoding="utf-8")
    garbage = root / "garbage.jsonl"
    garbage.write_text(GARBAGE, encoding="utf-8")
    not_a_ckpt = root / "not_a_checkpoint.pt"
    not_a_ckpt.write_bytes(random.Random(0).randbytes(2048))  # fixed bytes: a reproducible failure
    ckpt = vit_ckpt
    captions = root / "captions.csv"
    captions.write_text("path_without_caption_column\nx.jpg\n", encoding="utf-8")
    feats = root / "feats.jsonl"
    feats.write_text(json.dumps({"image_id": 1, "feature": [0.1, "x"]}) + "\n", encoding="utf-8")
    return {
        "root": root,
        "raw": raw,
        "garbage": garbage,
        "bad_ckpt": not_a_ckpt,
        "ckpt": ckpt,
        "captions": captions,
        "feats": feats,
    }


def _cases(p: dict[str, Path]) -> dict[str, list[str]]:
    root = p["root"]
    return {
        "build_lmdb": ["cn_clip.preprocess.build_lmdb_dataset", "--data_dir", str(p["raw"]), "--splits", "train"],
        "stats": ["cn_clip.preprocess.stats", str(p["raw"]), "--splits", "train"],
        "from_folder": [
            "cn_clip.preprocess.from_folder",
            "--images",
            str(root),
            "--captions",
            str(p["captions"]),
            "--out",
            str(root / "ff"),
        ],
        "export_images": ["cn_clip.preprocess.export_images", str(root / "missing_imgs"), "--out", str(root / "ex")],
        "topk": [
            "cn_clip.eval.make_topk_predictions",
            "--image-feats",
            str(p["feats"]),
            "--text-feats",
            str(p["garbage"]),
            "--output",
            str(root / "pred.jsonl"),
        ],
        "topk_tr": [
            "cn_clip.eval.make_topk_predictions_tr",
            "--image-feats",
            str(p["garbage"]),
            "--text-feats",
            str(p["feats"]),
            "--output",
            str(root / "pred_tr.jsonl"),
        ],
        "transform_tr": ["cn_clip.eval.transform_ir_annotation_to_tr", "--input", str(p["garbage"])],
        "extract": [
            "cn_clip.eval.extract_features",
            "--extract-text-feats",
            "--text-data",
            str(p["garbage"]),
            "--resume",
            str(p["ckpt"]),
            *TINY_FLAGS,
        ],
        "extract_bad_ckpt": [
            "cn_clip.eval.extract_features",
            "--extract-text-feats",
            "--text-data",
            str(p["garbage"]),
            "--resume",
            str(p["bad_ckpt"]),
            *TINY_FLAGS,
        ],
        "zeroshot": [
            "cn_clip.eval.zeroshot_evaluation",
            "--datapath",
            str(root / "no_such_dir"),
            "--label-file",
            str(p["garbage"]),
            "--resume",
            str(p["ckpt"]),
            *TINY_FLAGS,
        ],
        "run": ["cn_clip.eval.run", "--data", str(root / "no_such_dataset"), "--resume", str(p["ckpt"]), *TINY_FLAGS],
        "train": ["cn_clip.training.main", "--train-data", str(root / "no_such_lmdb"), "--logs", "none", *TINY_FLAGS],
        "onnx": [
            "cn_clip.deploy.pytorch_to_onnx",
            "--model-arch",
            TINY_ARCH,
            "--pytorch-ckpt-path",
            str(p["bad_ckpt"]),
            "--save-onnx-path",
            str(root / "onnx" / "m"),
            "--convert-text",
        ],
        "to_hf": ["cn_clip.convert", "to-hf", str(p["bad_ckpt"]), str(root / "hf")],
        "search": ["cn_clip.search", "query", "--index", str(root / "no_index"), "一只猫"],
    }


def _run(module_args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", *module_args], capture_output=True, text=True, timeout=240, env=env)


def test_every_cli_fails_cleanly(inputs: dict[str, Path]) -> None:
    cases = _cases(inputs)
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = dict(zip(cases, pool.map(_run, cases.values()), strict=True))
    failures = []
    for name, proc in results.items():
        if proc.returncode == 0 or "Traceback" in proc.stderr or "error" not in proc.stderr.lower():
            failures.append(f"{name}: exit {proc.returncode}\n{proc.stderr[-1500:]}")
    assert not failures, "\n\n".join(failures)


def test_evaluation_writes_the_failure_json(inputs: dict[str, Path]) -> None:
    out = inputs["root"] / "eval_out.json"
    proc = _run(["cn_clip.eval.evaluation", str(inputs["garbage"]), str(inputs["garbage"]), str(out)])
    assert proc.returncode != 0 and "Traceback" not in proc.stderr + proc.stdout
    result = json.loads(out.read_text(encoding="utf-8"))
    assert result["success"] is False and result["score"] == 0 and result["errorMsg"]
