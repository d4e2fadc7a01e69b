"""Reference module ``cn_clip.clip.model``: model classes and weight helpers under their old names."""

from __future__ import annotations

import torch
from torch import nn

from cn_clip.models.clip_model import CLIP
from cn_clip.models.factory import convert_weights, load_partial
from cn_clip.models.resnet import ModifiedResNet
from cn_clip.models.vit import VisionTransformer as VisualTransformer
from cn_clip.weights import clean_state_dict, convert_state_dict
from cn_clip.weights import resize_pos_embed as _resize_pos_embed

__all__ = [
    "CLIP",
    "ModifiedResNet",
    "VisualTransformer",
    "convert_models_to_fp32",
    "convert_state_dict",
    "convert_weights",
    "resize_pos_embed",
    "restore_model",
]


def convert_models_to_fp32(model: nn.Module) -> None:
    for param in model.parameters():
        param.data = param.data.float()
        if param.grad is not None:
            param.grad.data = param.grad.data.float()


def resize_pos_embed(state_dict: dict, model: nn.Module, interpolation: str = "bicubic", seq_dim: int = 1, prefix=""):
    """Interpolate ``{prefix}visual.positional_embedding`` in ``state_dict`` to the model's grid, in place."""
    del interpolation, seq_dim  # always bicubic over the square grid, as the reference
    stripped = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    _resize_pos_embed(stripped, model)
    key = "visual.positional_embedding"
    if key in stripped:
        state_dict[prefix + key] = stripped[key]


def restore_model(model: CLIP, clip_state_dict: dict, bert_state_dict: dict, use_flash_attention: bool = False):
    """Merge a flat CLIP (``visual*`` + ``logit_scale``) and a flat BERT dict into ``model``; returns it in eval."""
    del use_flash_attention
    merged = {k: v for k, v in clean_state_dict(clip_state_dict or {}).items() if k.startswith(("visual", "logit"))}
    merged.update({k: v for k, v in clean_state_dict(bert_state_dict or {}).items() if k.startswith("bert")})
    load_partial(model, {k: torch.as_tensor(v) for k, v in merged.items()}, "restore_model")
    return model.eval()
