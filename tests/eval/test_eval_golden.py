"""Golden parity with the reference scripts (fixtures: tests/fixtures/gen_eval_fixtures.py, cn-clip 1.6.0)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from cn_clip.eval import evaluation, evaluation_tr, make_topk_predictions, make_topk_predictions_tr
from cn_clip.eval import transform_ir_annotation_to_tr as transform
from cn_clip.eval.metrics import error_json

pytestmark = pytest.mark.parity

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "eval"
MANIFEST = json.loads((FIXTURES / "manifest.json").read_text(encoding="utf-8"))
SCORING = FIXTURES / "scoring"
TOPK = FIXTURES / "topk"
MAINS = {
    "evaluation": evaluation.main,
    "evaluation_tr": evaluation_tr.main,
    "make_topk_predictions": make_topk_predictions.main,
    "make_topk_predictions_tr": make_topk_predictions_tr.main,
}

_INVALID_ID = "Found an invalid {} {}, it should be an integer (not string), please check your schema"
# Where the reference is buggy we assert the fixed message instead of its output (compatibility.md#fix-eval-query-id).
FIXED_MESSAGES = {
    "t2i_invalid_query_id_first": _INVALID_ID.format("text_id", "1"),  # reference: UnboundLocalError text
    "t2i_invalid_query_id_later": _INVALID_ID.format("text_id", "x2"),  # reference: the previous line's id
    "t2i_number_line": "There exists one line not containing text_id: 5",  # reference: TypeError text
    "i2t_number_line": "There exists one line not containing image_id: 5",
    "t2i_gt_missing": "[Errno 2] No such file or directory: 'nope.jsonl'",  # reference: the errno, 2
    "i2t_gt_missing": "[Errno 2] No such file or directory: 'nope.jsonl'",
    "t2i_bad_utf8": "'utf-8' codec can't decode byte 0xff in position 21: invalid start byte",  # reference: 'utf-8'
    "i2t_bad_utf8": "'utf-8' codec can't decode byte 0xff in position 22: invalid start byte",
}


def _stdout_for(message: str, case: dict) -> str:
    head = f"Read standard from {case['gt']}\nRead user submit file from {case['pred']}\n"
    return head + f"The evaluation failed: {message}\n"


@pytest.mark.parametrize("case", MANIFEST["scoring"], ids=lambda c: c["name"])
def test_evaluation_matches_reference(case, tmp_path, monkeypatch, capsys):
    for name in ("gt.jsonl", "gt.tr.jsonl", case["pred"]):
        if (SCORING / name).exists():
            shutil.copy(SCORING / name, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    code = MAINS[case["module"]]([case["gt"], case["pred"], case["out"]])
    produced = (tmp_path / case["out"]).read_text(encoding="utf-8")
    stdout = capsys.readouterr().out
    if case["name"] in FIXED_MESSAGES:
        message = FIXED_MESSAGES[case["name"]]
        assert produced == json.dumps(error_json(message))
        assert stdout == _stdout_for(message, case)
    else:
        assert produced == (SCORING / case["out"]).read_text(encoding="utf-8")
        assert stdout == (SCORING / case["stdout"]).read_text(encoding="utf-8")
    assert code == (0 if json.loads(produced)["success"] else 1)


@pytest.mark.parametrize("backend", ["numpy", "torch", "faiss"])
@pytest.mark.parametrize("run", MANIFEST["topk"], ids=lambda r: r["name"])
def test_topk_matches_reference(run, backend, tmp_path, capsys):
    output = tmp_path / "pred.jsonl"
    argv = [
        "--image-feats",
        str(TOPK / run["image_feats"]),
        "--text-feats",
        str(TOPK / run["text_feats"]),
        "--top-k",
        str(run["top_k"]),
        "--eval-batch-size",
        str(run["eval_batch_size"]),
        "--output",
        str(output),
        "--backend",
        backend,
    ]
    assert MAINS[run["module"]](argv) == 0
    assert output.read_bytes() == (TOPK / run["expected"]).read_bytes()
    assert capsys.readouterr().out == f"Top-{run['top_k']} predictions are saved in {output}\nDone!\n"


@pytest.mark.parametrize("query_chunk", ["1", "4"])
def test_topk_small_chunks_match_reference(query_chunk, tmp_path):
    output = tmp_path / "pred.jsonl"
    argv = [
        "--image-feats",
        str(TOPK / "img.jsonl"),
        "--text-feats",
        str(TOPK / "txt.jsonl"),
        "--top-k",
        "10",
        "--eval-batch-size",
        "3",
        "--query-batch-size",
        query_chunk,
        "--output",
        str(output),
    ]
    assert make_topk_predictions.main(argv) == 0
    assert output.read_bytes() == (TOPK / "ref_t2i_k10.jsonl").read_bytes()


def test_transform_matches_reference(tmp_path, capsys):
    shutil.copy(SCORING / "gt.jsonl", tmp_path / "gt.jsonl")
    assert transform.main(["--input", str(tmp_path / "gt.jsonl")]) == 0
    assert (tmp_path / "gt.tr.jsonl").read_bytes() == (SCORING / "gt.tr.jsonl").read_bytes()
    assert capsys.readouterr().out == "Done!\n"
