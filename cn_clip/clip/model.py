"""Reference module ``cn_clip.clip.model``: model classes and weight helpers under their old names."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from cn_clip.clip.utils import warn_flash_attention_noop
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
_POS_EMBED_MODES = ("bilinear", "bicubic")  # the modes F.interpolate accepts with align_corners=True for 2-D grids


def convert_models_to_fp32(model: nn.Module) -> None:
    for param in model.parameters():
        param.data = param.data.float()
        if param.grad is not None:
            param.grad.data = param.grad.data.float()


def resize_pos_embed(state_dict: dict, model: nn.Module, interpolation: str = "bicubic", seq_dim: int = 1, prefix=""):
    """Interpolate ``{prefix}visual.positional_embedding`` in ``state_dict`` to the model's grid, in place, with
    ``interpolation`` (``"bilinear"`` or ``"bicubic"``, ``align_corners=True``) as the reference does.

    ``seq_dim`` is accepted and, as in the reference, unused (the sequence is always the first dimension of the
    stored ``[tokens, width]`` tensor); any other value than 1 warns."""
    if interpolation not in _POS_EMBED_MODES:
        raise ValueError(f"resize_pos_embed: interpolation must be one of {_POS_EMBED_MODES}, got {interpolation!r}")
    if seq_dim != 1:
        warnings.warn(
            f"resize_pos_embed(seq_dim={seq_dim}) changes nothing: the reference ignores seq_dim too", stacklevel=2
        )
    model = getattr(model, "module", model)  # a DDP-wrapped model, as the reference's trainer passes
    stripped = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    _resize_pos_embed(stripped, model, mode=interpolation)
    key = "visual.positional_embedding"
    if key in stripped:
        state_dict[prefix + key] = stripped[key]


def restore_model(model: CLIP, clip_state_dict: dict, bert_state_dict: dict, use_flash_attention: bool = False):
    """Merge a flat CLIP (``visual*`` + ``logit_scale``) and a flat BERT dict into ``model``; returns it in eval.
    Either dict may be in the flash-attention key layout; ``use_flash_attention=True`` therefore changes nothing."""
    if use_flash_attention:
        warn_flash_attention_noop("restore_model(use_flash_attention=True)")
    merged = {k: v for k, v in clean_state_dict(clip_state_dict or {}).items() if k.startswith(("visual", "logit"))}
    merged.update({k: v for k, v in clean_state_dict(bert_state_dict or {}).items() if k.startswith("bert")})
    load_partial(model, {k: torch.as_tensor(v) for k, v in merged.items()}, "restore_model")
    return model.eval()
