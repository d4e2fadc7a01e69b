"""Optional dependencies: each belongs to one extra of ``pip install "cn_clip[...]"`` (see setup.py and the README).

``require("faiss")`` imports and returns the module, or raises :class:`MissingExtraError` whose one-line message
names the ``pip install`` that fixes it; entry points print that line and exit 2.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from cn_clip.errors import CnClipError

# top-level module -> (distribution on PyPI, extra of cn_clip that installs it)
OPTIONAL: dict[str, tuple[str, str]] = {
    "onnx": ("onnx", "deploy"),
    "onnxruntime": ("onnxruntime", "deploy"),
    "onnxscript": ("onnxscript", "deploy"),
    "faiss": ("faiss-cpu", "search"),
    "fastapi": ("fastapi", "search"),
    "uvicorn": ("uvicorn", "search"),
    "multipart": ("python-multipart", "search"),
    "deepspeed": ("deepspeed", "deepspeed"),
    "peft": ("peft", "train"),
    "webdataset": ("webdataset", "train"),
    "fsspec": ("fsspec", "train"),
    "matplotlib": ("matplotlib", "plots"),
    "skimage": ("scikit-image", "demo"),
}


class MissingExtraError(CnClipError):
    """An optional dependency is not installed."""


def install_hint(module: str) -> str:
    """``'pip install "cn_clip[search]"'`` for ``faiss`` and its submodules."""
    _, extra = OPTIONAL[module.partition(".")[0]]
    return f'pip install "cn_clip[{extra}]"'


def missing_message(module: str, purpose: str) -> str:
    distribution, _ = OPTIONAL[module.partition(".")[0]]
    return f"{purpose} needs {distribution}, which is not installed: {install_hint(module)}"


def require(module: str, purpose: str) -> ModuleType:
    """Import ``module`` (e.g. ``"onnxruntime.quantization"``) for ``purpose`` (e.g. ``"--int8"``), or raise
    :class:`MissingExtraError`. A package that is installed but fails inside its own imports is not hidden."""
    top = module.partition(".")[0]
    if top not in OPTIONAL:
        raise KeyError(f"{top} is not an optional dependency of cn_clip (add it to cn_clip.extras.OPTIONAL)")
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name is None or exc.name.partition(".")[0] != top:
            raise
        raise MissingExtraError(missing_message(module, purpose)) from None
