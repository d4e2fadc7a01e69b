"""Retention: zero-shot top-1 of a model on a held-out classification set, before and while adapting it.

A retention set is the ELEVATER zero-shot layout ``zeroshot_evaluation.py`` reads: ``DIR/label_cn.txt`` (one class
name per line) and class folders ``000/``, ``001/``, … of images, either directly in ``DIR`` or in ``DIR/test``.
The prompt ensemble is the one the reference picks for the folder's name (``openai`` unless the name is one of the
ELEVATER sets), so the number equals what ``zeroshot_evaluation.py --logit-scale 100`` prints as top-1.

``RetentionMonitor`` measures the set once before training (the baseline) and again at each check, logs the change
in points, and warns when the drop exceeds the threshold: fine-tuning that forgets shows up in the log, not weeks
later.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from cn_clip.errors import DataError

_logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class RetentionSet:
    """Where a zero-shot set's images and class names are, and the prompts used to build its classifier."""

    root: Path  # the directory the user named
    image_dir: Path  # the folder holding the class folders
    classnames: tuple[str, ...]
    templates: tuple[str, ...]


def open_retention_set(path: str | Path) -> RetentionSet:
    """Check the layout of ``path`` and read its class names; a wrong layout is a one-line :class:`DataError`."""
    from cn_clip.eval import zeroshot as Z

    root = Path(path).expanduser()
    if not root.is_dir():
        raise DataError(f"retention set {root}: not a directory")
    label_file = root / "label_cn.txt"
    if not label_file.is_file():
        raise DataError(f"retention set {root}: no label_cn.txt (expected DIR/label_cn.txt and class folders)")
    image_dir = root / "test" if (root / "test").is_dir() else root
    classnames = Z.read_classnames(label_file)
    folders = sorted(p.name for p in image_dir.iterdir() if p.is_dir())
    from cn_clip.eval.zeroshot import check_class_folders

    check_class_folders(folders, len(classnames), str(image_dir))
    _, templates = Z.load_templates(None, root.name)
    return RetentionSet(root, image_dir, tuple(classnames), tuple(templates))


@torch.no_grad()
def zero_shot_top1(
    model: Any,
    rset: RetentionSet,
    device: str | torch.device = "cpu",
    batch_size: int = 64,
    num_workers: int = 0,
    context_length: int = 52,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> float:
    """Top-1 accuracy (%) of ``model`` (a CLIP; its mode is restored afterwards) on ``rset``, logit scale 100."""
    import numpy as np
    from torch.utils.data import DataLoader

    from cn_clip.eval import zeroshot as Z
    from cn_clip.eval.features import l2_normalize
    from cn_clip.eval.zeroshot import open_image_folder

    was_training = model.training
    model.eval()
    try:
        with autocast():
            classifier = Z.build_classifier(
                lambda tokens: model.encode_text(tokens.to(device)).float(),
                list(rset.classnames),
                list(rset.templates),
                context_length,
                progress=False,
            )
            folder = open_image_folder(str(rset.image_dir), model.cfg.vision.image_resolution, len(rset.classnames))
            loader = DataLoader(folder, batch_size=batch_size, shuffle=False, num_workers=num_workers)
            features, targets = [], []
            for images, labels in loader:
                features.append(l2_normalize(model.encode_image(images.to(device)).float()))
                targets.append(labels.numpy())
    finally:
        model.train(was_training)
    if not features:
        raise DataError(f"retention set {rset.image_dir}: no images")
    probs = Z.class_probabilities(np.concatenate(features), classifier, Z.REFERENCE_LOGIT_SCALE)
    return 100.0 * Z.zeroshot_metrics(probs, np.concatenate(targets), ks=(1,))["top1"]


class RetentionMonitor:
    """Zero-shot top-1 on a retention set at the start of training and at every check, with the change logged.

    ``baseline`` can be passed in (a resumed run keeps the value measured before its first step).
    """

    def __init__(
        self,
        path: str | Path,
        warn_drop: float = 5.0,
        device: str | torch.device = "cpu",
        batch_size: int = 64,
        context_length: int = 52,
        baseline: float | None = None,
        autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    ) -> None:
        self.path = str(path)  # as given; a resumed run reuses the baseline only for the same set
        self.rset = open_retention_set(path)
        self.warn_drop = warn_drop
        self.device = device
        self.batch_size = batch_size
        self.context_length = context_length
        self.baseline = baseline
        self.autocast = autocast
        self.last: float | None = None

    def measure(self, model: Any) -> float:
        return zero_shot_top1(
            model, self.rset, self.device, self.batch_size, 0, self.context_length, autocast=self.autocast
        )

    def check(self, model: Any, steps: int) -> dict[str, float]:
        """Measure now; the first call sets the baseline. Returns ``retention_top1`` and ``retention_change``."""
        top1 = self.measure(model)
        self.last = top1
        name, count = self.rset.root, len(self.rset.classnames)
        if self.baseline is None:
            self.baseline = top1
            _logger.info("Retention before training (%s, %d classes) | zero-shot top-1: %.2f", name, count, top1)
            return {"retention_top1": top1, "retention_change": 0.0}
        change = top1 - self.baseline
        _logger.info(
            "Retention @ %d steps (%s) | zero-shot top-1: %.2f | before training: %.2f | change: %+.2f points",
            steps,
            name,
            top1,
            self.baseline,
            change,
        )
        if -change > self.warn_drop:
            _logger.warning(
                "Retention fell %.2f points on %s (more than --retention-warn %g): the model is forgetting what it "
                "knew; consider a lower --lr, LoRA / locked layers, or WiSE-FT (docs/training.md)",
                -change,
                name,
                self.warn_drop,
            )
        return {"retention_top1": top1, "retention_change": change}
