"""Pure scoring functions: recall@K on hand-written queries and the submission rule table (both directions)."""

from __future__ import annotations

import json

import pytest

from cn_clip.eval.evaluation import evaluate
from cn_clip.eval.evaluation_tr import compute_score as compute_score_tr
from cn_clip.eval.metrics import (
    SubmissionError,
    compute_score,
    recall_at_k,
    score_json,
    validate_submission_lines,
)


def test_recall_at_k_three_queries():
    ranked = {1: [5, 6, 7], 2: [8, 9, 10], 3: [11, 12, 13]}
    truth = {1: [5], 2: [10, 99], 3: []}  # hit at 1, hit at 3, empty truth never hits
    assert recall_at_k(ranked, truth, ks=(1, 3)) == {"r1": 1 / 3, "r3": 2 / 3}


def test_recall_ignores_extra_predictions_and_needs_every_truth_query():
    assert recall_at_k({1: [1], 7: [7]}, {1: [1]}, ks=(1,)) == {"r1": 1.0}
    with pytest.raises(KeyError):
        recall_at_k({1: [1]}, {1: [1], 2: [2]}, ks=(1,))
    with pytest.raises(SubmissionError, match="no queries"):
        recall_at_k({}, {}, ks=(1,))


def test_score_json_key_order_and_arithmetic():
    out = score_json({"r1": 2 / 7, "r5": 3 / 7, "r10": 5 / 7})
    assert list(out) == ["success", "score", "scoreJson"]
    assert list(out["scoreJson"]) == ["score", "mean_recall", "r1", "r5", "r10"]
    assert out["score"] == (2 / 7 + 3 / 7 + 5 / 7) / 3.0 * 100


def _ok(qkey: str, tkey: str, qid: int = 1) -> dict:
    return {qkey: qid, tkey: list(range(10))}


# (line object or raw text, T2I message, I2T message); "{q}" is the query id 1.
RULES = [
    ("{oops", "Cannot parse this line into json object: {oops", None),
    ("", "Cannot parse this line into json object: ", None),
    (
        {"x": 1},
        'There exists one line not containing text_id: {"x": 1}',
        'There exists one line not containing image_id: {"x": 1}',
    ),
    ("7", "There exists one line not containing text_id: 7", "There exists one line not containing image_id: 7"),
    (
        {"Q": "1", "T": list(range(10))},
        "Found an invalid text_id 1, it should be an integer (not string), please check your schema",
        "Found an invalid image_id 1, it should be an integer (not string), please check your schema",
    ),
    (
        {"Q": 1.5, "T": list(range(10))},
        "Found an invalid text_id 1.5, it should be an integer (not string), please check your schema",
        "Found an invalid image_id 1.5, it should be an integer (not string), please check your schema",
    ),
    (
        {"Q": 1},
        'There exists one line not containing the predicted image_ids: {"Q": 1}',
        'There exists one line not containing the predicted text_ids: {"Q": 1}',
    ),
    (
        {"Q": 1, "T": {"a": 1}},
        "The image_ids field of text_id 1 is not a list, please check your schema",
        "The text_ids field of image_id 1 is not a list, please check your schema",
    ),
    (
        {"Q": 1, "T": list(range(11))},
        "Text_id 1 has wrong number of predicted image_ids! Require 10, but 11 founded.",
        "Image_id 1 has wrong number of predicted text_ids! Require 10, but 11 founded.",
    ),
    (
        {"Q": 1, "T": [0, 1, 2, 3, 4, 5, 6, 7, 8, None]},
        "Text_id 1 has an invalid predicted image_id None at rank 10, it should be an integer (not string), please "
        "check your schema",
        "Image_id 1 has an invalid predicted text_id None at rank 10, it should be an integer (not string), please "
        "check your schema",
    ),
    (
        {"Q": 1, "T": [0, 1, 2, 3, 4, 5, 6, 7, 8, 8]},
        "Text_id 1 has duplicate topk images in your prediction. Pleace check again!",
        "Image_id 1 has duplicate topk texts in your prediction. Pleace check again!",
    ),
]


def _render(line: object, qkey: str, tkey: str) -> str:
    if isinstance(line, str):
        return line
    return json.dumps({{"Q": qkey, "T": tkey}.get(key, key): value for key, value in line.items()})


@pytest.mark.parametrize("direction", ["text_to_image", "image_to_text"])
@pytest.mark.parametrize(("line", "t2i", "i2t"), RULES)
def test_submission_rule_messages(direction, line, t2i, i2t):
    qkey, tkey = ("text_id", "image_ids") if direction == "text_to_image" else ("image_id", "text_ids")
    expected = t2i if direction == "text_to_image" else (i2t or t2i)
    expected = expected.replace('{"Q"', '{"' + qkey + '"')
    lines = [json.dumps(_ok(qkey, tkey)), _render(line, qkey, tkey)]
    with pytest.raises(SubmissionError) as info:
        validate_submission_lines(lines, {1: [0]}, direction)
    assert str(info.value) == expected


@pytest.mark.parametrize(
    ("direction", "message"),
    [
        ("text_to_image", "The following text_ids have no prediction in your submission, please check again: 2, 3"),
        ("image_to_text", "The following image_ids have no prediction in your submission, please check again: 2, 3"),
    ],
)
def test_missing_predictions_listed(direction, message):
    qkey, tkey = ("text_id", "image_ids") if direction == "text_to_image" else ("image_id", "text_ids")
    with pytest.raises(SubmissionError, match="^" + message + "$"):
        validate_submission_lines([json.dumps(_ok(qkey, tkey))], {1: [], 2: [], 3: []}, direction)


def test_bool_ids_pass_and_last_line_wins():
    lines = [
        json.dumps({"text_id": 1, "image_ids": list(range(10))}),
        json.dumps({"text_id": True, "image_ids": [True] + list(range(2, 11))}),
    ]
    assert validate_submission_lines(lines, {1: [1]}) == {1: [True] + list(range(2, 11))}


def _write_case(tmp_path, gt_lines, pred_lines):
    gt, pred = tmp_path / "gt.jsonl", tmp_path / "pred.jsonl"
    gt.write_text("".join(json.dumps(o) + "\n" for o in gt_lines), encoding="utf-8")
    pred.write_text("".join(json.dumps(o) + "\n" for o in pred_lines), encoding="utf-8")
    return gt, pred


def test_compute_score_both_directions(tmp_path):
    gt, pred = _write_case(
        tmp_path,
        [{"text_id": 1, "image_ids": [3]}, {"text_id": 2, "image_ids": [50]}],
        [{"text_id": 1, "image_ids": list(range(10))}, {"text_id": 2, "image_ids": list(range(10))}],
    )
    assert compute_score(gt, pred) == [(0 + 0.5 + 0.5) / 3.0 * 100, 0.0, 50.0, 50.0]
    gt_tr, pred_tr = _write_case(
        tmp_path, [{"image_id": 3, "text_ids": [1]}], [{"image_id": 3, "text_ids": [1] + list(range(10, 19))}]
    )
    assert compute_score_tr(gt_tr, pred_tr) == [100.0, 100.0, 100.0, 100.0]


@pytest.mark.parametrize(
    ("gt_text", "fragment"),
    [
        ('{"text_id": 1, "image_ids": [1]}\n{broken\n', "gt.jsonl:2: cannot parse this ground-truth line"),
        ('{"text_id": 1}\n', "gt.jsonl:1: ground-truth line lacks text_id or image_ids"),
        ("", "The ground truth has no queries"),
    ],
)
def test_bad_ground_truth_gives_failure_json(tmp_path, gt_text, fragment, capsys):
    gt, pred = _write_case(tmp_path, [], [{"text_id": 1, "image_ids": list(range(10))}])
    gt.write_text(gt_text, encoding="utf-8")
    result = evaluate(gt, pred, tmp_path / "out.json")
    assert result["success"] is False and fragment in result["errorMsg"]
    assert json.loads((tmp_path / "out.json").read_text()) == result
    assert capsys.readouterr().out.splitlines()[-1].startswith("The evaluation failed: ")
