"""The two calibration plots (matplotlib, headless): a reliability diagram and a precision–recall curve."""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any

import numpy as np

from cn_clip.fileio import atomic_write

_logger = logging.getLogger(__name__)

RELIABILITY_PNG = "reliability.png"
PRECISION_RECALL_PNG = "precision_recall.png"
_LABELS = {
    "cosine": "raw cosine",
    "softmax": "softmax over candidates",
    "siglip": "SigLIP sigmoid",
    "calibrated": "calibrated",
}


def _pyplot() -> Any:
    from cn_clip.extras import require

    matplotlib = require("matplotlib", "the calibration plots (or pass --no-plots)")
    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def _save(figure: Any, path: Path) -> Path:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    with atomic_write(path, "wb") as handle:
        handle.write(buffer.getvalue())
    return path


def reliability_bins(probs: np.ndarray, labels: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per non-empty bin: mean probability, observed match rate, count."""
    index = np.clip((np.asarray(probs) * bins).astype(np.int64), 0, bins - 1)
    count = np.bincount(index, minlength=bins)
    conf = np.bincount(index, weights=probs, minlength=bins)
    hits = np.bincount(index, weights=labels.astype(np.float64), minlength=bins)
    used = count > 0
    return conf[used] / count[used], hits[used] / count[used], count[used]


def save_plots(result: Any, out_dir: str | Path) -> list[Path]:
    """``reliability.png`` and ``precision_recall.png`` from a :class:`cn_clip.eval.calibrate.FitResult`."""
    from cn_clip.eval.calibrate import ECE_BINS, precision_recall_curve

    plt = _pyplot()
    out = Path(out_dir)
    labels = result.holdout.label
    method = result.calibrator.method
    metrics = result.calibrator.report["metrics"]

    figure, axis = plt.subplots(figsize=(5, 5))
    axis.plot([0, 1], [0, 1], color="grey", linestyle=":", label="perfect")
    for name, probs in result.curves.items():
        conf, rate, _ = reliability_bins(probs, labels, ECE_BINS)
        ece = metrics["after"]["ece"] if name == "calibrated" else metrics["before"][name]["ece"]
        title = f"{_LABELS[name]}{f' ({method})' if name == 'calibrated' else ''}, ECE {ece:.3f}"
        axis.plot(conf, rate, marker="o", label=title)
    axis.set(xlabel="predicted probability", ylabel="observed match rate", xlim=(0, 1), ylim=(0, 1))
    axis.set_title(f"Reliability on {len(labels)} held-out pairs")
    axis.legend(loc="upper left", fontsize=8)
    paths = [_save(figure, out / RELIABILITY_PNG)]
    plt.close(figure)

    figure, axis = plt.subplots(figsize=(5, 5))
    _, precision, recall = precision_recall_curve(result.holdout.cosine, labels)
    axis.plot(recall, precision, label="threshold on cosine")
    threshold = result.calibrator.report.get("threshold")
    if threshold and threshold.get("cosine") is not None:
        axis.scatter([threshold["recall"]], [threshold["precision"]], color="red", zorder=3)
        axis.annotate(
            f"cos ≥ {threshold['cosine']:.3f}: P {threshold['precision']:.2f}, R {threshold['recall']:.2f}",
            (threshold["recall"], threshold["precision"]),
            textcoords="offset points",
            xytext=(8, -16) if threshold["recall"] < 0.5 else (-8, -16),
            ha="left" if threshold["recall"] < 0.5 else "right",
            fontsize=8,
        )
    axis.set(xlabel="recall", ylabel="precision", xlim=(0, 1.02), ylim=(0, 1.02))
    axis.set_title(f"Precision–recall on {len(labels)} held-out pairs")
    axis.legend(loc="lower left", fontsize=8)
    paths.append(_save(figure, out / PRECISION_RECALL_PNG))
    plt.close(figure)
    _logger.info("plots written: %s", ", ".join(str(p) for p in paths))
    return paths
