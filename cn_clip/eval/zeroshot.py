"""Zero-shot classification: prompt ensembles (templates/ is data), classifier weights, predictions, metrics, and
the ELEVATER submission JSON of the reference's ``zeroshot_evaluation.py``.

Templates are strings with a ``{c}`` placeholder for the class name (``{}`` is accepted in user files too). The
bundled sets are the reference's, copied verbatim (see ``templates/zeroshot_templates.json``, ``source``).
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cn_clip.errors import ConfigError, DataError

_logger = logging.getLogger(__name__)

TEMPLATES_DIR = Path(__file__).parent / "templates"
PLACEHOLDER = "{c}"
REFERENCE_LOGIT_SCALE = 100.0


# ------------------------------------------------------------------------------------------------ templates
@functools.cache
def _template_data() -> dict[str, Any]:
    return json.loads((TEMPLATES_DIR / "zeroshot_templates.json").read_text(encoding="utf-8"))


def template_sets() -> dict[str, list[str]]:
    """Every bundled set by name (``openai``, ``food``, ``flower``, ``aircraft``, ``imagenet``, …)."""
    return dict(_template_data()["templates"])


def template_set_for_dataset(dataset: str) -> str:
    """The set the reference uses for ``--dataset``: six ELEVATER names have their own, all others ``openai``."""
    data = _template_data()
    return data["dataset_templates"].get(dataset, data["default"])


def load_templates(spec: str | None = None, dataset: str = "imagenet") -> tuple[str, list[str]]:
    """``(description, templates)``: ``spec`` = a bundled set name or a file (JSON list / ``{"templates": [...]}``
    / text with one template per line); None → the reference's choice for ``dataset``."""
    sets = template_sets()
    if spec is None:
        name = template_set_for_dataset(dataset)
        return name, sets[name]
    if spec in sets:
        return spec, sets[spec]
    path = Path(spec)
    if not path.is_file():
        raise ConfigError(f"--templates {spec!r} is neither a bundled set ({', '.join(sorted(sets))}) nor a file")
    return str(path), _read_template_file(path)


def _read_template_file(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ConfigError(f"{path}: not valid JSON ({exc})") from None
        items = data.get("templates") if isinstance(data, dict) else data
        if not isinstance(items, list) or not all(isinstance(t, str) for t in items):
            raise ConfigError(f'{path}: expected a JSON list of strings or {{"templates": [...]}}')
        numbered = list(enumerate(items, 1))
    else:
        numbered = [(i, line.strip()) for i, line in enumerate(text.splitlines(), 1) if line.strip()]
    templates = []
    for lineno, template in numbered:
        template = template.replace("{}", PLACEHOLDER)
        if PLACEHOLDER not in template:
            raise ConfigError(f"{path}:{lineno}: template {template!r} has no {{c}} (or {{}}) for the class name")
        templates.append(template)
    if not templates:
        raise ConfigError(f"{path}: no templates")
    return templates


def fill(template: str, classname: str) -> str:
    return template.replace(PLACEHOLDER, classname)


@functools.cache
def imagenet_classnames() -> list[str]:
    """The reference's 1000 Chinese ImageNet class names (``太阳镜`` twice, as published)."""
    data = json.loads((TEMPLATES_DIR / "imagenet_classnames.json").read_text(encoding="utf-8"))
    return list(data["classnames"])


def read_classnames(path: str | os.PathLike) -> list[str]:
    """One class per line, stripped, id = line index (``label_cn.txt``); trailing blank lines are ignored."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"label file not found: {path}")
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    while names and not names[-1]:
        names.pop()
    blank = [i for i, name in enumerate(names, 1) if not name]
    if blank:
        raise DataError(f"{path}:{blank[0]}: empty class name")
    if not names:
        raise DataError(f"{path}: no class names")
    return names


# ---------------------------------------------------------------------------------------------- classifier
def build_classifier(
    encode_text: Callable[[Any], Any],
    classnames: Sequence[str],
    templates: Sequence[str],
    context_length: int = 52,
    batch_size: int = 512,
    progress: bool = True,
    tokenizer: Any = None,
) -> np.ndarray:
    """Classifier weights ``[D, C]``: per class, every filled template normalised (lowercase, quotes) and encoded,
    features L2-normalised, averaged, re-normalised (the reference's recipe). Classes are encoded several at a
    time (about ``batch_size`` texts per batch). ``tokenizer``: the architecture's (None: Chinese WordPiece)."""
    from tqdm import tqdm

    from cn_clip.eval.features import l2_normalize
    from cn_clip.tokenizer import get_tokenizer

    tokenizer = tokenizer or get_tokenizer()
    per_batch = max(1, batch_size // len(templates))
    columns = []
    for start in tqdm(range(0, len(classnames), per_batch), desc="classes", disable=not progress):
        group = classnames[start : start + per_batch]
        texts = [tokenizer.normalize(fill(t, name)) for name in group for t in templates]
        features = l2_normalize(encode_text(tokenizer(texts, context_length)))
        means = features.reshape(len(group), len(templates), -1).mean(axis=1)  # [G, D]
        columns.append(means / np.linalg.norm(means, axis=1, keepdims=True))
    return np.concatenate(columns).T.astype(np.float32)  # [D, C]


def class_probabilities(image_features: np.ndarray, classifier: np.ndarray, logit_scale: float) -> np.ndarray:
    """``softmax(logit_scale · image_features @ classifier)`` in float32, ``[N, C]``."""
    import torch

    logits = logit_scale * (torch.from_numpy(image_features) @ torch.from_numpy(classifier))
    return logits.softmax(dim=-1).numpy()


# ------------------------------------------------------------------------------------------------- metrics
def zeroshot_metrics(probs: np.ndarray, targets: np.ndarray, ks: Iterable[int] = (1, 5)) -> dict[str, float]:
    """``top{k}`` accuracy (true top-k: the target among the k best classes; k is capped at C) and
    ``mean_per_class`` (mean over the classes present of their top-1 recall)."""
    import torch

    probs_t, targets_t = torch.from_numpy(np.ascontiguousarray(probs)), torch.from_numpy(np.asarray(targets))
    n, n_classes = probs_t.shape
    if n == 0:
        raise DataError("no images to evaluate")
    ks = list(ks)
    ranked = probs_t.topk(min(max(ks), n_classes), dim=1).indices  # same ranking as the reference's topk
    hits = ranked == targets_t[:, None]
    result = {f"top{k}": float(hits[:, : min(k, n_classes)].any(dim=1).sum()) / n for k in ks}
    top1_hit = hits[:, 0].numpy()
    present = np.unique(targets)
    result["mean_per_class"] = float(np.mean([top1_hit[targets == c].mean() for c in present]))
    return result


# ------------------------------------------------------------------------------------------- ELEVATER output
def param_counts(model: Any) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    visual = sum(p.numel() for p in model.visual.parameters())
    return {"num_params": total, "num_visual_params": visual, "num_backbone_params": total}


def elevater_json(vision_model: str, dataset: str, counts: dict[str, int], probs: np.ndarray) -> str:
    """The reference's submission JSON (same keys, order and separators), probabilities rounded to 6 decimals
    exactly as its ``round(float(x), 6)`` over the JSON text does; ``predictions`` is ``[1, N, C]``."""
    rounded = [[round(value, 6) for value in row] for row in np.asarray(probs, dtype=np.float32).tolist()]
    payload = {
        "model_name": "CN-CLIP-" + vision_model,
        "dataset_name": dataset,
        "num_trainable_params": 0,
        "num_params": counts["num_params"],
        "num_visual_params": counts["num_visual_params"],
        "num_backbone_params": counts["num_backbone_params"],
        "n_shot": 0,
        "rnd_seeds": [123],
        "predictions": [rounded],
    }
    return json.dumps(payload)


def read_index(path: str | os.PathLike, n: int) -> list[int]:
    """The ELEVATER ``index.json``: a list of row numbers reordering the predictions."""
    try:
        index = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"--index {path}: cannot read a JSON list ({exc})") from None
    if not isinstance(index, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in index):
        raise DataError(f"--index {path}: expected a JSON list of integers")
    bad = [i for i in index if not -n <= i < n]
    if bad:
        raise DataError(f"--index {path}: row {bad[0]} out of range for {n} images")
    return index


# ------------------------------------------------------------------------------ ELEVATER class folders
class TargetFirst:
    """An ImageFolder as ``(target, image)`` items, the ``(id, input)`` shape :func:`extract_features` reads."""

    def __init__(self, folder: Any) -> None:
        self.folder = folder

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, index: int) -> tuple[int, Any]:
        image, target = self.folder[index]
        return target, image


def open_image_folder(datapath: str, resolution: int, n_classes: int) -> Any:
    """torchvision's ImageFolder (RGB loader, folders sorted by name = class ids), checked against the labels."""
    from torchvision.datasets import ImageFolder

    from cn_clip.transforms import image_transform

    if not Path(datapath).is_dir():
        raise DataError(f"--datapath {datapath} is not a directory")
    try:
        folder = ImageFolder(datapath, transform=image_transform(resolution))
    except (FileNotFoundError, RuntimeError) as exc:
        raise DataError(f"--datapath {datapath}: {exc}") from None
    check_class_folders(folder.classes, n_classes, datapath)
    return folder


def check_class_folders(classes: Sequence[str], n_classes: int, root: str) -> None:
    """Folder k (in name order) is class k of the label file: counts must agree, numeric names must sort as
    numbers (``0``–``9``, or zero-padded ``000``…), else predictions would be scored against the wrong class."""
    if len(classes) != n_classes:
        raise DataError(f"{root} has {len(classes)} class folders but the label file lists {n_classes} classes")
    if all(name.isdigit() for name in classes):
        wrong = [(i, name) for i, name in enumerate(classes) if int(name) != i]
        if wrong:
            position, name = wrong[0]
            raise DataError(
                f"{root}: class folder {name!r} sorts at position {position}; name folders 0..{n_classes - 1} "
                "zero-padded to equal width (e.g. 000, 001, …) so that name order equals class id"
            )
