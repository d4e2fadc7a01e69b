"""Reference module ``cn_clip.clip.utils``: ``create_model``, ``_MODELS``, ``_MODEL_INFO``, ``_download``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cn_clip.models.factory import create_model as _create_model
from cn_clip.models.factory import load_from_name, released_file
from cn_clip.models.pretrained import PRETRAINED, available_models
from cn_clip.transforms import image_transform

_MODELS = {name: (info.hf_repo, info.filename) for name, info in PRETRAINED.items()}
_MODEL_INFO = {
    name: {"struct": info.architecture, "input_resolution": info.resolution} for name, info in PRETRAINED.items()
}

__all__ = ["available_models", "create_model", "image_transform", "load_from_name", "_MODELS", "_MODEL_INFO"]


def create_model(model_name: str, checkpoint: dict[str, Any] | None = None, use_flash_attention: bool = False):
    """``create_model("ViT-B-16@RoBERTa-wwm-ext-base-chinese", checkpoint_dict)``; returns an fp32 model."""
    del use_flash_attention
    return _create_model(model_name, checkpoint)


def _download(model_name: str | tuple, root: str, use_modelscope: bool = False) -> str:
    """Download a released model into ``root`` (verified by SHA-256) and return its path."""
    name = model_name if isinstance(model_name, str) else next(n for n, v in _MODELS.items() if v == tuple(model_name))
    return str(Path(released_file(name, root, use_modelscope)))
