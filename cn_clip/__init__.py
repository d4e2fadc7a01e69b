"""cn_clip: Chinese CLIP toolkit, compatible with OFA-Sys/Chinese-CLIP (cn-clip 1.6.0).

The public API is resolved lazily (PEP 562) so that ``import cn_clip`` loads neither torch nor transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

from cn_clip.version import __version__

_LAZY = {
    "load_from_name": "cn_clip.models.factory",
    "load": "cn_clip.models.factory",
    "create_model": "cn_clip.models.factory",
    "available_models": "cn_clip.models.pretrained",
    "list_models": "cn_clip.models.registry",
    "tokenize": "cn_clip.tokenizer",
    "get_tokenizer": "cn_clip.tokenizer",
    "normalize_text": "cn_clip.tokenizer",
    "image_transform": "cn_clip.transforms",
    "Calibrator": "cn_clip.eval.calibrate",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'cn_clip' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
