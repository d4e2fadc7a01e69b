"""Recall@K and the reference's submission rules, as pure functions parameterised by direction.

Message texts are the reference's, verbatim (typos such as "founded" and "Pleace" included), because leaderboard
users match on them. Deliberate fixes: an invalid query id is named by its real value, and lines that are JSON but
not objects are reported as lacking the query key (the reference crashed with a TypeError text for numbers).
"""

from __future__ import annotations

import json
import os
from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import Any

from cn_clip.eval.directions import Direction, get_direction

NUM_K = 10  # predictions required per query by the submission rules
DEFAULT_KS = (1, 5, 10)


class SubmissionError(Exception):
    """A rule of the evaluation was broken; the message is what goes into the failure JSON."""


def recall_at_k(
    ranked: Mapping[Hashable, Sequence[Any]],
    truth: Mapping[Hashable, Iterable[Any]],
    ks: Sequence[int] = DEFAULT_KS,
) -> dict[str, float]:
    """Fraction of ground-truth queries with any true id among their first K predictions: ``{"r1": 0.71, ...}``.

    Every query of ``truth`` counts (an empty truth list never hits); extra queries in ``ranked`` are ignored.
    """
    if not truth:
        raise SubmissionError("The ground truth has no queries, recall is undefined")
    hits = dict.fromkeys(ks, 0)
    for qid, true_ids in truth.items():
        predicted = ranked[qid]
        true_set = set(true_ids)
        for k in ks:
            top = predicted[:k]
            if any(true_id in top for true_id in true_set):
                hits[k] += 1
    # hits * 1.0 / n, as the reference: the percentages below must match it to the last bit.
    return {f"r{k}": hits[k] * 1.0 / len(truth) for k in ks}


def score_json(recalls: Mapping[str, float]) -> dict[str, Any]:
    """The reference's success JSON from r1/r5/r10 fractions (percentages, this key order)."""
    r1, r5, r10 = recalls["r1"], recalls["r5"], recalls["r10"]
    mean_recall = (r1 + r5 + r10) / 3.0
    return {
        "success": True,
        "score": mean_recall * 100,
        "scoreJson": {
            "score": mean_recall * 100,
            "mean_recall": mean_recall * 100,
            "r1": r1 * 100,
            "r5": r5 * 100,
            "r10": r10 * 100,
        },
    }


def error_json(message: str) -> dict[str, Any]:
    """The reference's failure JSON (this key order)."""
    return {"errorDetail": message, "errorMsg": message, "score": 0, "scoreJson": {}, "success": False}


def read_ground_truth(path: str | os.PathLike, direction: str | Direction = "text_to_image") -> dict[Any, list]:
    """``query id → true ids`` from a ground-truth JSONL (a repeated query: the last line wins)."""
    spec = get_direction(direction)
    truth: dict[Any, list] = {}
    with open(path, encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, 1):
            line = line.strip()
            try:
                obj = json.loads(line)
            except ValueError:
                raise SubmissionError(
                    f"{path}:{lineno}: cannot parse this ground-truth line into json object: {line}"
                ) from None
            if not isinstance(obj, dict) or spec.query_key not in obj or spec.target_key not in obj:
                raise SubmissionError(
                    f"{path}:{lineno}: ground-truth line lacks {spec.query_key} or {spec.target_key}: {line}"
                )
            truth[obj[spec.query_key]] = obj[spec.target_key]
    return truth


def validate_submission_lines(
    lines: Iterable[str], reference: Mapping[Any, Any], direction: str | Direction = "text_to_image", k: int = NUM_K
) -> dict[Any, list]:
    """Apply the reference's submission rules in its order; return ``query id → predicted ids``."""
    spec = get_direction(direction)
    submission: dict[Any, list] = {}
    for raw in lines:
        qid, predicted = _validate_line(raw.strip(), spec, k)
        submission[qid] = predicted
    # The same set expression as the reference, so the ids are listed in the same order.
    missing = set(reference.keys()) - set(submission.keys())
    if len(missing) != 0:
        raise SubmissionError(
            f"The following {spec.query_key}s have no prediction in your submission, please check again: "
            + ", ".join([str(qid) for qid in missing])
        )
    return submission


def _validate_line(line: str, spec: Direction, k: int) -> tuple[Any, list]:
    query, target, label = spec.query_key, spec.target_key, spec.query_label
    target_item, noun = target[:-1], spec.gallery_noun
    try:
        obj = json.loads(line)
    except ValueError:
        raise SubmissionError(f"Cannot parse this line into json object: {line}") from None
    if not isinstance(obj, dict) or query not in obj:
        raise SubmissionError(f"There exists one line not containing {query}: {line}")
    qid = obj[query]
    if not isinstance(qid, int):
        raise SubmissionError(
            f"Found an invalid {query} {qid}, it should be an integer (not string), please check your schema"
        )
    if target not in obj:
        raise SubmissionError(f"There exists one line not containing the predicted {target}: {line}")
    predicted = obj[target]
    if not isinstance(predicted, list):
        raise SubmissionError(f"The {target} field of {query} {qid} is not a list, please check your schema")
    if len(predicted) != k:
        raise SubmissionError(
            f"{label} {qid} has wrong number of predicted {target}! Require {k}, but {len(predicted)} founded."
        )
    for rank, item in enumerate(predicted, 1):
        if not isinstance(item, int):
            raise SubmissionError(
                f"{label} {qid} has an invalid predicted {target_item} {item} at rank {rank}, "
                "it should be an integer (not string), please check your schema"
            )
    if len(set(predicted)) != k:
        raise SubmissionError(f"{label} {qid} has duplicate topk {noun} in your prediction. Pleace check again!")
    return qid, predicted


def read_submission(
    path: str | os.PathLike,
    reference: Mapping[Any, Any],
    direction: str | Direction = "text_to_image",
    k: int = NUM_K,
) -> dict[Any, list]:
    if not os.path.exists(path):
        raise SubmissionError("The submission file is not found!")
    with open(path, encoding="utf-8") as handle:
        return validate_submission_lines(handle, reference, direction, k)


def compute_score(
    golden_file: str | os.PathLike, predict_file: str | os.PathLike, direction: str | Direction = "text_to_image"
) -> list[float]:
    """``[mean_recall, R@1, R@5, R@10]`` in percent, as the reference's ``compute_score``."""
    truth = read_ground_truth(golden_file, direction)
    recalls = recall_at_k(read_submission(predict_file, truth, direction), truth)
    inner = score_json(recalls)["scoreJson"]
    return [inner["mean_recall"], inner["r1"], inner["r5"], inner["r10"]]
