"""Cosine → match probability: fit on a validation split, save as ``calib.json``, apply anywhere.

Methods (``Calibrator.method``):

- ``platt``: ``p = sigmoid(a·cos + b)``, a logistic regression on the cosine (``a > 0``, so it is monotone).
- ``isotonic``: the best non-decreasing step map (pool-adjacent-violators), linear between steps.
- ``temperature``: ``p = softmax(s·cos)`` over a query's whole candidate set, ``s`` fitted by maximum likelihood
  of the true match (the model's own ``exp(logit_scale)`` is the uncalibrated baseline). Called on rows of
  candidates: the last axis is the candidate set.
- ``siglip``: ``p = sigmoid(s·cos + b)`` with a SigLIP model's own scale and bias; nothing is fitted.

Fitting uses pairs built from a ground truth: every true (text, image) pair is a positive; each text adds its
``hard`` highest-scoring non-matching images and ``random`` random non-matching ones as negatives. Texts (not pairs)
are split into a fitting part and a held-out part, and every reported number comes from the held-out pairs.
A probability therefore means "how likely is a pair drawn like these a match" (see docs/scores.md).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cn_clip.errors import CnClipError, DataError
from cn_clip.fileio import atomic_write

_logger = logging.getLogger(__name__)

FORMAT = "cn_clip.calibration"
FORMAT_VERSION = 1
METHODS = ("platt", "isotonic", "temperature", "siglip")
FIT_METHODS = ("platt", "isotonic", "temperature")
ECE_BINS = 15


class CalibrationError(CnClipError):
    """A calibration input or ``calib.json`` is unusable."""


# ------------------------------------------------------------------------------------------- the map itself
@dataclass
class Calibrator:
    """A fitted cosine → probability map; ``Calibrator.load(path)(cosines)`` returns probabilities."""

    method: str
    params: dict[str, Any]
    checkpoint: dict[str, Any] | None = None  # {"path", "sha256"} of the model the cosines came from
    report: dict[str, Any] = field(default_factory=dict)  # fit statistics and held-out metrics

    def __post_init__(self) -> None:
        _check_params(self.method, self.params, "<calibrator>")

    @property
    def per_row(self) -> bool:
        """True when probabilities depend on the whole candidate row (``temperature``)."""
        return self.method == "temperature"

    def __call__(self, cosines: Any) -> np.ndarray:
        """Probabilities, same shape as ``cosines`` (a number, list, numpy array or tensor)."""
        if hasattr(cosines, "detach"):
            cosines = cosines.detach().float().cpu().numpy()
        x = np.asarray(cosines, dtype=np.float64)
        p = self.params
        if self.method in ("platt", "siglip"):
            slope, offset = (p["a"], p["b"]) if self.method == "platt" else (p["scale"], p["bias"])
            return _sigmoid(slope * x + offset)
        if self.method == "isotonic":
            return np.interp(x, p["x"], p["y"])
        if x.ndim == 0:
            raise CalibrationError("temperature calibration needs a row of candidate cosines, got a single number")
        return _softmax(p["scale"] * x)

    def log_normaliser(self, queries: np.ndarray, gallery: np.ndarray, chunk: int = 4096) -> np.ndarray:
        """``logsumexp(s · queries @ gallery.T)`` per query row, for ``temperature`` over a whole gallery."""
        scale = float(self.params["scale"])
        out = np.empty(len(queries), dtype=np.float64)
        for start in range(0, len(queries), chunk):
            logits = scale * (
                np.asarray(queries[start : start + chunk], np.float32) @ np.asarray(gallery, np.float32).T
            )
            out[start : start + chunk] = _logsumexp(logits.astype(np.float64))
        return out

    def log_normaliser_of_scores(self, cosines: np.ndarray) -> np.ndarray:
        """``logsumexp(s · cosines)`` along the last axis: the cosines of every candidate, per row."""
        return _logsumexp(self.params["scale"] * np.asarray(cosines, np.float64))

    def probabilities_of_hits(self, hit_cosines: np.ndarray, log_norm: np.ndarray | None = None) -> np.ndarray:
        """Probabilities of top-k hits ``[Q, k]``; ``temperature`` needs each row's :meth:`log_normaliser`."""
        if not self.per_row:
            return self(hit_cosines)
        if log_norm is None:
            raise CalibrationError("temperature probabilities of hits need the whole gallery's normaliser")
        return np.exp(self.params["scale"] * np.asarray(hit_cosines, np.float64) - log_norm[:, None])

    # ---- files ---------------------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "method": self.method,
            "params": self.params,
            "checkpoint": self.checkpoint,
            **self.report,
        }

    def save(self, path: str | os.PathLike) -> Path:
        with atomic_write(path) as handle:
            json.dump(self.to_json(), handle, ensure_ascii=False, indent=1)
            handle.write("\n")
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike, checkpoint: str | os.PathLike | None = None) -> Calibrator:
        """Read a ``calib.json``; with ``checkpoint``, warn if it was fitted on another model's cosines."""
        path = Path(path)
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise CalibrationError(f"{path}: no such calibration file") from None
        except (ValueError, UnicodeDecodeError) as exc:
            raise CalibrationError(f"{path}: not JSON ({exc})") from None
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            found = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
            raise CalibrationError(f"{path}: not a cn_clip calibration file (format {found!r}, expected {FORMAT!r})")
        if raw.get("version") != FORMAT_VERSION:
            raise CalibrationError(f"{path}: calibration format version {raw.get('version')!r}, expected 1")
        method = raw.get("method")
        if method not in METHODS:
            raise CalibrationError(f"{path}: unknown method {method!r}; expected one of {', '.join(METHODS)}")
        _check_params(method, raw.get("params"), str(path))
        report = {k: v for k, v in raw.items() if k not in ("format", "version", "method", "params", "checkpoint")}
        calibrator = cls(method, raw["params"], raw.get("checkpoint"), report)
        if checkpoint is not None:
            calibrator.check_checkpoint(checkpoint, source=str(path))
        return calibrator

    def check_checkpoint(self, checkpoint: str | os.PathLike, source: str = "calib.json") -> bool:
        """Warn (and return False) when ``checkpoint`` is not the model this calibration was fitted for."""
        if not self.checkpoint or not self.checkpoint.get("sha256"):
            _logger.warning("%s records no checkpoint hash: cannot check it fits %s", source, checkpoint)
            return False
        digest = checkpoint_sha256(checkpoint)
        if digest == self.checkpoint["sha256"]:
            return True
        _logger.warning(
            "%s was fitted on %s (sha256 %s) but the model in use is %s (sha256 %s): its probabilities may be wrong",
            source,
            self.checkpoint.get("path"),
            self.checkpoint["sha256"][:16],
            checkpoint,
            digest[:16],
        )
        return False


def checkpoint_sha256(path: str | os.PathLike) -> str:
    from cn_clip.hub import sha256_of

    return sha256_of(Path(path))


def _check_params(method: str, params: Any, source: str) -> None:
    wanted = {"platt": ("a", "b"), "isotonic": ("x", "y"), "temperature": ("scale",), "siglip": ("scale", "bias")}
    if method not in wanted:
        raise CalibrationError(f"{source}: unknown method {method!r}; expected one of {', '.join(METHODS)}")
    if not isinstance(params, dict) or any(k not in params for k in wanted[method]):
        raise CalibrationError(f"{source}: method {method!r} needs params {list(wanted[method])}, got {params!r}")
    if method == "isotonic":
        x, y = params["x"], params["y"]
        ok = isinstance(x, list) and isinstance(y, list) and len(x) == len(y) >= 1
        if not ok or bool(np.any(np.diff(x) <= 0)) or bool(np.any(np.diff(y) < 0)):
            raise CalibrationError(f"{source}: isotonic params need increasing x and non-decreasing y of equal length")
    elif method in ("platt", "temperature", "siglip"):
        slope = params["a"] if method == "platt" else params["scale"]
        if not isinstance(slope, int | float) or not slope > 0:
            raise CalibrationError(f"{source}: {method} slope must be a positive number, got {slope!r}")


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # overflow-free logistic


def _logsumexp(z: np.ndarray) -> np.ndarray:
    top = z.max(axis=-1)
    return top + np.log(np.exp(z - top[..., None]).sum(axis=-1))


def _softmax(z: np.ndarray) -> np.ndarray:
    return np.exp(z - _logsumexp(z)[..., None])


# ------------------------------------------------------------------------------------------- fitting
def fit_platt(cosines: np.ndarray, labels: np.ndarray, iterations: int = 100) -> dict[str, float]:
    """Maximum-likelihood ``(a, b)`` of ``sigmoid(a·x + b)`` by Newton's method (a 2×2 system per step)."""
    x, y = np.asarray(cosines, np.float64), np.asarray(labels, np.float64)
    _check_labels(y)
    design = np.stack([x, np.ones_like(x)], axis=1)
    theta = np.array([1.0, -float(np.mean(x))])
    for _ in range(iterations):
        p = _sigmoid(design @ theta)
        weight = np.maximum(p * (1 - p), 1e-12)
        hessian = design.T @ (design * weight[:, None]) + 1e-9 * np.eye(2)
        step = np.linalg.solve(hessian, design.T @ (y - p))
        theta = theta + step
        if np.max(np.abs(step)) < 1e-10:
            break
    if not theta[0] > 0:
        raise CalibrationError(
            f"Platt fit gives slope {theta[0]:.4g} ≤ 0: higher cosines are not more often matches (wrong features?)"
        )
    return {"a": float(theta[0]), "b": float(theta[1])}


def fit_isotonic(cosines: np.ndarray, labels: np.ndarray) -> dict[str, list[float]]:
    """Pool-adjacent-violators on (cosine, label) sorted by cosine; equal cosines are pooled first."""
    x, y = np.asarray(cosines, np.float64), np.asarray(labels, np.float64)
    _check_labels(y)
    xs, inverse = np.unique(x, return_inverse=True)
    sums = np.bincount(inverse, weights=y)
    counts = np.bincount(inverse).astype(np.float64)
    # Blocks as a stack of [value sum, weight, first x index, last x index]; merge while the order is violated.
    blocks: list[list[float]] = []
    for i in range(len(xs)):
        blocks.append([sums[i], counts[i], i, i])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] >= blocks[-1][0] / blocks[-1][1]:
            s, w, _, last = blocks.pop()
            blocks[-1][0] += s
            blocks[-1][1] += w
            blocks[-1][3] = last
    knots_x: list[float] = []
    knots_y: list[float] = []
    for s, w, first, last in blocks:
        value = s / w
        for index in sorted({int(first), int(last)}):
            knots_x.append(float(xs[index]))
            knots_y.append(value)
    return {"x": knots_x, "y": knots_y}


def fit_temperature(query_scores: Sequence[np.ndarray], positives: Sequence[np.ndarray]) -> dict[str, float]:
    """The scale ``s`` maximising ``Σ log softmax(s·row)[positive]`` (golden-section search on log s)."""

    def nll(log_s: float) -> float:
        s = math.exp(log_s)
        total = 0.0
        for row, pos in zip(query_scores, positives, strict=True):
            logits = s * row.astype(np.float64)
            total -= float(np.mean(logits[pos]) - _logsumexp(logits))
        return total

    lo, hi = math.log(1e-2), math.log(1e4)
    ratio = (math.sqrt(5) - 1) / 2
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = nll(a), nll(b)
    for _ in range(60):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = nll(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = nll(b)
    return {"scale": float(math.exp((lo + hi) / 2))}


def _check_labels(y: np.ndarray) -> None:
    if y.size == 0:
        raise CalibrationError("no pairs to fit on (empty split?)")
    if not (y == 1).any() or not (y == 0).any():
        raise CalibrationError("the pairs need both positives and negatives to fit a calibration")


# ------------------------------------------------------------------------------------------- metrics
def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """``Σ_b n_b/N · |accuracy_b − confidence_b|`` over ``bins`` equal-width bins of the probability."""
    p, y = np.asarray(probs, np.float64), np.asarray(labels, np.float64)
    index = np.clip((p * bins).astype(np.int64), 0, bins - 1)
    count = np.bincount(index, minlength=bins)
    gap = np.abs(np.bincount(index, weights=y, minlength=bins) - np.bincount(index, weights=p, minlength=bins))
    return float(gap.sum() / max(count.sum(), 1))


def brier_score(probs: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean((np.asarray(probs, np.float64) - np.asarray(labels, np.float64)) ** 2))


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Probability that a random positive outscores a random negative (ties count half): Mann–Whitney U."""
    s, y = np.asarray(scores, np.float64), np.asarray(labels).astype(bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    average_rank = ends - (counts - 1) / 2.0  # 1-based average rank of each distinct score
    rank_sum = average_rank[inverse][y].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def reliability_metrics(probs: np.ndarray, labels: np.ndarray, scores: np.ndarray | None = None) -> dict[str, float]:
    """ECE, Brier and ROC-AUC (of ``scores`` if given, else of the probabilities)."""
    return {
        "ece": expected_calibration_error(probs, labels),
        "brier": brier_score(probs, labels),
        "roc_auc": roc_auc(probs if scores is None else scores, labels),
    }


def precision_recall_curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(thresholds descending, precision, recall)`` of the rule "match iff score ≥ threshold"."""
    s, y = np.asarray(scores, np.float64), np.asarray(labels, np.float64)
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    last_of_value = np.r_[np.flatnonzero(np.diff(s) != 0), len(s) - 1]  # ties enter together
    tp = np.cumsum(y)[last_of_value]
    predicted = last_of_value + 1.0
    return s[last_of_value], tp / predicted, tp / max(y.sum(), 1.0)


def threshold_for_precision(scores: np.ndarray, labels: np.ndarray, target: float) -> dict[str, float] | None:
    """The lowest score threshold whose precision is ≥ ``target`` (the most recall at that precision)."""
    thresholds, precision, recall = precision_recall_curve(scores, labels)
    ok = np.flatnonzero(precision >= target)
    if len(ok) == 0:
        return None
    best = ok[np.argmax(recall[ok])]
    return {"threshold": float(thresholds[best]), "precision": float(precision[best]), "recall": float(recall[best])}


# ------------------------------------------------------------------------------------------- pairs
@dataclass
class PairSet:
    """Labelled (text, image) pairs with their cosines, and each text's whole score row (for ``temperature``)."""

    cosine: np.ndarray  # [P] float64
    label: np.ndarray  # [P] int8
    text_row: np.ndarray  # [P] index into ``rows``
    rows: list[np.ndarray]  # per text: cosines against every image [I] (float32)
    positives: list[np.ndarray]  # per text: column indices of its true images

    def subset(self, texts: np.ndarray) -> PairSet:
        keep = np.isin(self.text_row, texts)
        remap = -np.ones(len(self.rows), dtype=np.int64)
        remap[texts] = np.arange(len(texts))
        return PairSet(
            self.cosine[keep],
            self.label[keep],
            remap[self.text_row[keep]],
            [self.rows[t] for t in texts],
            [self.positives[t] for t in texts],
        )


def build_pairs(
    text_matrix: np.ndarray,
    image_matrix: np.ndarray,
    truth: Sequence[Sequence[int]],
    hard: int = 5,
    random: int = 5,
    seed: int = 0,
) -> PairSet:
    """Positives from ``truth`` (per text row: true image columns), plus ``hard`` + ``random`` negatives each."""
    if len(text_matrix) == 0 or len(image_matrix) == 0:
        raise CalibrationError(f"empty split: {len(text_matrix)} texts and {len(image_matrix)} images")
    rng = np.random.default_rng(seed)
    n_images = len(image_matrix)
    images = np.asarray(image_matrix, np.float32)
    cos, lab, row_of, rows, positives = [], [], [], [], []
    for t, true_cols in enumerate(truth):
        scores = (np.asarray(text_matrix[t], np.float32) @ images.T).astype(np.float64)
        pos = np.unique(np.asarray(true_cols, dtype=np.int64))
        negative = np.ones(n_images, dtype=bool)
        negative[pos] = False
        neg_cols = np.flatnonzero(negative)
        chosen = neg_cols[np.argsort(-scores[neg_cols], kind="stable")[:hard]] if hard else neg_cols[:0]
        rest = np.setdiff1d(neg_cols, chosen, assume_unique=True)
        if random and len(rest):
            chosen = np.r_[chosen, rng.choice(rest, size=min(random, len(rest)), replace=False)]
        cols = np.r_[pos, chosen]
        cos.append(scores[cols])
        lab.append(np.r_[np.ones(len(pos), np.int8), np.zeros(len(chosen), np.int8)])
        row_of.append(np.full(len(cols), t, dtype=np.int64))
        rows.append(scores.astype(np.float32))
        positives.append(pos)
    label = np.concatenate(lab)
    if not label.any():
        raise CalibrationError("the ground truth names no (text, image) pair present in the features: no positives")
    return PairSet(np.concatenate(cos), label, np.concatenate(row_of), rows, positives)


def truth_columns(
    text_ids: Sequence[Any], image_ids: Sequence[Any], ground_truth: Mapping[Any, Sequence[Any]], source: str
) -> tuple[list[int], list[list[int]]]:
    """Text rows that have a ground truth, and each one's true image columns (images without features skipped)."""
    column = {image_id: j for j, image_id in enumerate(image_ids)}
    rows, cols = [], []
    for i, text_id in enumerate(text_ids):
        wanted = [column[image_id] for image_id in ground_truth.get(text_id, ()) if image_id in column]
        if wanted:
            rows.append(i)
            cols.append(wanted)
    if not rows:
        raise CalibrationError(f"{source}: no positives: none of its (text_id, image_ids) pairs is in the features")
    return rows, cols


# ------------------------------------------------------------------------------------------- one fit
@dataclass
class FitOptions:
    method: str = "platt"
    hard_negatives: int = 5
    random_negatives: int = 5
    holdout: float = 0.3
    seed: int = 0
    target_precision: float | None = None
    logit_scale: float | None = None  # exp(logit_scale) of the model: the raw softmax baseline
    logit_bias: float | None = None  # a SigLIP model's bias: its own sigmoid probabilities


@dataclass
class FitResult:
    calibrator: Calibrator
    holdout: PairSet
    curves: dict[str, np.ndarray]  # held-out probabilities per variant: "cosine", "softmax", "siglip", "calibrated"


def split_texts(n_texts: int, holdout: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    if not 0 < holdout < 1:
        raise CalibrationError(f"--holdout must be in (0, 1), got {holdout}")
    order = np.random.default_rng(seed).permutation(n_texts)
    n_held = max(1, int(round(n_texts * holdout)))
    if n_held >= n_texts:
        raise CalibrationError(f"{n_texts} texts with a ground truth: too few to hold some out (need ≥ 2)")
    return np.sort(order[n_held:]), np.sort(order[:n_held])


def probabilities_of(calibrator: Calibrator, pairs: PairSet) -> np.ndarray:
    """Each pair's probability; ``temperature`` normalises over its text's whole row."""
    if not calibrator.per_row:
        return calibrator(pairs.cosine)
    scale = calibrator.params["scale"]
    log_norm = np.array([_logsumexp(scale * row.astype(np.float64)) for row in pairs.rows])
    return np.exp(scale * pairs.cosine - log_norm[pairs.text_row])


def fit(pairs: PairSet, options: FitOptions) -> FitResult:
    """Fit ``options.method`` on part of the texts, measure on the rest, pick the target-precision threshold."""
    fit_texts, held_texts = split_texts(len(pairs.rows), options.holdout, options.seed)
    train, held = pairs.subset(fit_texts), pairs.subset(held_texts)
    if not held.label.any():
        raise CalibrationError("the held-out texts have no positive pair; use more texts or another --seed")
    calibrator = Calibrator(options.method, _fit_params(train, options))
    curves = {"cosine": np.clip(held.cosine, 0.0, 1.0)}
    if options.logit_scale is not None:
        curves["softmax"] = probabilities_of(Calibrator("temperature", {"scale": options.logit_scale}), held)
    if options.logit_bias is not None and options.logit_scale is not None:
        own = {"scale": options.logit_scale, "bias": options.logit_bias}
        curves["siglip"] = Calibrator("siglip", own)(held.cosine)
    curves["calibrated"] = probabilities_of(calibrator, held)
    before = {
        name: reliability_metrics(p, held.label, held.cosine) for name, p in curves.items() if name != "calibrated"
    }
    report: dict[str, Any] = {
        "fit": {
            "texts": len(train.rows),
            "pairs": int(len(train.label)),
            "positives": int(train.label.sum()),
            "hard_negatives": options.hard_negatives,
            "random_negatives": options.random_negatives,
            "seed": options.seed,
        },
        "holdout": {"texts": len(held.rows), "pairs": int(len(held.label)), "positives": int(held.label.sum())},
        "metrics": {"before": before, "after": reliability_metrics(curves["calibrated"], held.label, held.cosine)},
    }
    if options.target_precision is not None:
        report["threshold"] = _threshold_report(calibrator, held, options.target_precision)
    calibrator.report = report
    return FitResult(calibrator, held, curves)


def _fit_params(train: PairSet, options: FitOptions) -> dict[str, Any]:
    if options.method == "platt":
        return fit_platt(train.cosine, train.label)
    if options.method == "isotonic":
        return fit_isotonic(train.cosine, train.label)
    if options.method == "temperature":
        return fit_temperature(train.rows, train.positives)
    if options.method == "siglip":
        if options.logit_bias is None or options.logit_scale is None:
            raise CalibrationError("--method siglip needs a SigLIP checkpoint (one with a logit_bias)")
        return {"scale": options.logit_scale, "bias": options.logit_bias}
    raise CalibrationError(f"unknown method {options.method!r}; choose from {', '.join(METHODS)}")


def _threshold_report(calibrator: Calibrator, held: PairSet, target: float) -> dict[str, Any]:
    if not 0 < target <= 1:
        raise CalibrationError(f"--target-precision must be in (0, 1], got {target}")
    found = threshold_for_precision(held.cosine, held.label, target)
    if found is None:
        _logger.warning("no cosine threshold reaches precision %.3f on the held-out pairs", target)
        return {"target_precision": target, "cosine": None, "precision": None, "recall": None, "probability": None}
    probability = None
    if not calibrator.per_row:
        probability = float(calibrator(found["threshold"]))
    return {
        "target_precision": target,
        "cosine": found["threshold"],
        "precision": found["precision"],
        "recall": found["recall"],
        "probability": probability,
    }


def format_report(report: Mapping[str, Any], method: str) -> str:
    """The human-readable table the CLI prints."""
    held = report["holdout"]
    lines = [
        f"held-out: {held['texts']} texts, {held['pairs']} pairs ({held['positives']} positives)",
        f"{'probability':<24}{'ECE':>8}{'Brier':>8}{'ROC-AUC':>9}",
    ]
    names = {"cosine": "raw cosine", "softmax": "softmax over candidates", "siglip": "SigLIP sigmoid"}
    rows = [(names[k], v) for k, v in report["metrics"]["before"].items()]
    rows.append((f"calibrated ({method})", report["metrics"]["after"]))
    for name, m in rows:
        lines.append(f"{name:<24}{m['ece']:>8.4f}{m['brier']:>8.4f}{m['roc_auc']:>9.4f}")
    threshold = report.get("threshold")
    if threshold:
        if threshold["cosine"] is None:
            lines.append(f"precision {threshold['target_precision']:.2f}: not reached by any cosine threshold")
        else:
            extra = (
                "" if threshold["probability"] is None else f" (calibrated probability {threshold['probability']:.3f})"
            )
            lines.append(
                f"precision ≥ {threshold['target_precision']:.2f}: cosine ≥ {threshold['cosine']:.4f}{extra}, "
                f"held-out precision {threshold['precision']:.3f}, recall {threshold['recall']:.3f}"
            )
    return "\n".join(lines)


def ground_truth_rows(path: str | os.PathLike) -> dict[Any, list]:
    """``text_id → image_ids`` from a reference ``*_texts.jsonl`` (one clear line per bad input)."""
    from cn_clip.eval.metrics import SubmissionError, read_ground_truth

    try:
        truth = read_ground_truth(path, "text_to_image")
    except SubmissionError as exc:
        raise DataError(str(exc)) from None
    if not truth:
        raise CalibrationError(f"{path}: empty ground truth (no lines)")
    if not any(truth.values()):
        raise CalibrationError(f"{path}: no positives (every line has empty image_ids)")
    return truth


# ------------------------------------------------------------------------------------------- whole runs
def calibrate_features(
    text_ids: Sequence[Any],
    text_matrix: np.ndarray,
    image_ids: Sequence[Any],
    image_matrix: np.ndarray,
    ground_truth: Mapping[Any, Sequence[Any]],
    options: FitOptions,
    *,
    checkpoint: str | os.PathLike | None = None,
    output_dir: str | os.PathLike | None = None,
    plots: bool = True,
    max_texts: int | None = None,
    source: str = "the ground truth",
) -> FitResult:
    """Pairs → fit → held-out report; writes ``calib.json`` (+ the two PNG plots) into ``output_dir``."""
    rows, columns = truth_columns(text_ids, image_ids, ground_truth, source)
    if max_texts is not None and len(rows) > max_texts:
        keep = np.sort(np.random.default_rng(options.seed).choice(len(rows), max_texts, replace=False))
        rows, columns = [rows[i] for i in keep], [columns[i] for i in keep]
        _logger.info("using %d of the texts with a ground truth (--max-texts)", max_texts)
    pairs = build_pairs(
        np.asarray(text_matrix)[rows],
        image_matrix,
        columns,
        options.hard_negatives,
        options.random_negatives,
        options.seed,
    )
    result = fit(pairs, options)
    if checkpoint is not None:
        result.calibrator.checkpoint = {"path": str(checkpoint), "sha256": checkpoint_sha256(checkpoint)}
    if output_dir is not None:
        out = Path(output_dir)
        if plots:
            from cn_clip.eval.calibration_plots import save_plots

            result.calibrator.report["plots"] = [str(p.name) for p in save_plots(result, out)]
        result.calibrator.save(out / "calib.json")
    return result


def model_scale_and_bias(checkpoint: str | os.PathLike) -> tuple[float, float | None]:
    """``(exp(logit_scale), logit_bias or None)`` read from a checkpoint without building the model."""
    from cn_clip.models.clip_model import LOGIT_BIAS_KEY
    from cn_clip.weights import clean_state_dict, read_checkpoint, state_dict_of

    raw = read_checkpoint(checkpoint)
    state = clean_state_dict(state_dict_of(raw, str(checkpoint)))
    if "logit_scale" not in state:
        raise CalibrationError(f"{checkpoint}: no logit_scale in its state_dict")
    bias = raw.get(LOGIT_BIAS_KEY)
    return float(state["logit_scale"].float().exp()), None if bias is None else float(bias)


def build_parser() -> Any:
    import argparse

    from cn_clip.cli.args import (
        add_context_length_arg,
        add_device_arg,
        add_model_args,
        add_num_workers_arg,
        add_precision_arg,
        add_resume_arg,
    )

    parser = argparse.ArgumentParser(
        prog="python -m cn_clip.eval.calibrate",
        description="Fit cosine → match probability on a validation split; writes calib.json and two plots.",
    )
    inputs = parser.add_argument_group("input: feature files, or a dataset split + checkpoint")
    inputs.add_argument("--image-feats", default=None, help="image feature file (.jsonl or .npy)")
    inputs.add_argument("--text-feats", default=None, help="text feature file (.jsonl or .npy)")
    inputs.add_argument("--gt-file", default=None, help="ground truth: the split's *_texts.jsonl (text_id, image_ids)")
    inputs.add_argument("--data", default=None, help="dataset dir with {split}_texts.jsonl and lmdb/{split}/imgs")
    inputs.add_argument("--split", default="valid", help="split of --data (default valid)")
    add_resume_arg(inputs)
    add_model_args(parser)
    add_precision_arg(parser)
    add_context_length_arg(parser)
    add_device_arg(parser)  # --data only
    add_num_workers_arg(parser)  # --data only
    fitting = parser.add_argument_group("fit")
    fitting.add_argument("--method", choices=METHODS, default="platt", help="platt (default), isotonic, temperature")
    fitting.add_argument("--hard-negatives", type=int, default=5, help="per text: its top-scoring wrong images")
    fitting.add_argument("--random-negatives", type=int, default=5, help="per text: random wrong images")
    fitting.add_argument("--holdout", type=float, default=0.3, help="fraction of texts held out for the report")
    fitting.add_argument("--max-texts", type=int, default=5000, help="use at most this many texts (memory)")
    fitting.add_argument("--seed", type=int, default=0, help="seeds the negatives and the held-out split")
    fitting.add_argument("--target-precision", type=float, default=None, help="report the cosine threshold for P")
    fitting.add_argument("--logit-scale", type=float, default=None, help="exp(logit_scale) when no --resume is given")
    parser.add_argument("--output-dir", default=None, help="default: DATA/eval/SPLIT, or the text features' folder")
    parser.add_argument("--no-plots", action="store_true", help="skip the two PNG plots")
    return parser


def _run(args: Any) -> int:
    from cn_clip.eval.featio import read_feature_files

    feature_mode = any(v is not None for v in (args.image_feats, args.text_feats, args.gt_file))
    if feature_mode == (args.data is not None):
        raise CalibrationError("give either --image-feats/--text-feats/--gt-file or --data (with --resume)")
    if feature_mode and None in (args.image_feats, args.text_feats, args.gt_file):
        raise CalibrationError("feature input needs all of --image-feats, --text-feats and --gt-file")
    for name in ("hard_negatives", "random_negatives"):
        if getattr(args, name) < 0:
            raise CalibrationError(f"--{name.replace('_', '-')} must be ≥ 0")
    scale, bias = (args.logit_scale, None) if args.resume is None else model_scale_and_bias(args.resume)
    if feature_mode:
        gt_file = args.gt_file
        images, texts = read_feature_files([(args.image_feats, "image_id"), (args.text_feats, "text_id")])
        out = Path(args.output_dir) if args.output_dir else Path(args.text_feats).parent
    else:
        gt_file, out, texts, images = _extract_split(args)
    options = FitOptions(
        args.method,
        args.hard_negatives,
        args.random_negatives,
        args.holdout,
        args.seed,
        args.target_precision,
        scale,
        bias,
    )
    result = calibrate_features(
        texts.ids,
        texts.matrix,
        images.ids,
        images.matrix,
        ground_truth_rows(gt_file),
        options,
        checkpoint=args.resume,
        output_dir=out,
        plots=not args.no_plots,
        max_texts=args.max_texts,
        source=str(gt_file),
    )
    print(format_report(result.calibrator.report, args.method))
    print(f"Calibration written to {out / 'calib.json'}")
    return 0


def _extract_split(args: Any) -> tuple[Path, Path, Any, Any]:
    """Features of ``--data``/``--split`` from ``--resume`` (written into the output dir, as ``eval.run`` does)."""
    from cn_clip.eval import features as F
    from cn_clip.runtime import resolve_device
    from cn_clip.tokenizer import get_tokenizer

    if args.resume is None:
        raise CalibrationError("--data needs --resume CKPT: the model whose cosines to calibrate")
    data = Path(args.data)
    texts_path, images_path = data / f"{args.split}_texts.jsonl", data / "lmdb" / args.split / "imgs"
    if not texts_path.is_file() or not images_path.is_dir():
        raise DataError(f"{data}: needs {texts_path.name} and lmdb/{args.split}/imgs")
    out = Path(args.output_dir) if args.output_dir else data / "eval" / args.split
    device = resolve_device(args.device)
    model, _ = F.load_eval_model(f"{args.vision_model}@{args.text_model}", args.resume, device, args.precision)
    tokenizer = get_tokenizer(model.cfg)
    opts = F.ExtractOptions(
        context_length=args.context_length, num_workers=args.num_workers, progress=False, tokenizer=tokenizer
    )
    text_encoder = F.TorchEncoder(model.encode_text, device, args.precision)
    image_encoder = F.TorchEncoder(model.encode_image, device, args.precision)
    resolution = model.cfg.vision.image_resolution
    texts = F.extract_texts(text_encoder, texts_path, out / f"{args.split}_texts.txt_feat.jsonl", opts)
    images = F.extract_images(image_encoder, images_path, resolution, out / f"{args.split}_imgs.img_feat.jsonl", opts)
    if len(texts.ids) == 0 or len(images.ids) == 0:
        raise CalibrationError(f"empty split {args.split}: {len(texts.ids)} texts, {len(images.ids)} images")
    return texts_path, out, texts, images


def main(argv: Sequence[str] | None = None) -> int:
    from cn_clip.cli.runner import run_cli, setup_logging

    setup_logging()
    return run_cli(lambda a: _run(build_parser().parse_args(a)), argv)


if __name__ == "__main__":
    raise SystemExit(main())
