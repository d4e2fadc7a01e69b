"""Evaluation: feature files, exact top-k retrieval, recall scoring (reference CLIs live in the submodules).

Names are imported on first use (PEP 562), so ``import cn_clip.eval`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Features": "cn_clip.eval.featio",
    "read_features": "cn_clip.eval.featio",
    "write_features_jsonl": "cn_clip.eval.featio",
    "write_features_npy": "cn_clip.eval.featio",
    "topk_search": "cn_clip.eval.topk",
    "evaluate_retrieval": "cn_clip.eval.topk",
    "recall_at_k": "cn_clip.eval.metrics",
    "compute_score": "cn_clip.eval.metrics",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'cn_clip.eval' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
