"""Compatibility façade for ``import cn_clip.clip as clip`` (the reference's public API).

Everything is resolved lazily, including ``_tokenizer``, which the reference built at import time.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "load_from_name": ("cn_clip.models.factory", "load_from_name"),
    "load": ("cn_clip.clip.utils", "load"),
    "available_models": ("cn_clip.models.pretrained", "available_models"),
    "tokenize": ("cn_clip.tokenizer", "tokenize"),
    "image_transform": ("cn_clip.transforms", "image_transform"),
    "FullTokenizer": ("cn_clip.clip.bert_tokenizer", "FullTokenizer"),
    "_tokenizer": ("cn_clip.tokenizer", "get_tokenizer"),
    "convert_state_dict": ("cn_clip.weights", "convert_state_dict"),
}

__all__ = ["load_from_name", "load", "available_models", "tokenize", "image_transform", "FullTokenizer"]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'cn_clip.clip' has no attribute {name!r}")
    module, attr = _LAZY[name]
    value = getattr(importlib.import_module(module), attr)
    if name == "_tokenizer":
        value = value()  # the reference exposed an instance, not a factory
    globals()[name] = value
    return value
