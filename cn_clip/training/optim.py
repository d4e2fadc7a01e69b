"""AdamW parameter groups: the reference's name-substring rule (default) or a role-based rule (``--wd-groups role``).

Reference rule (compatibility.md#optimizer-schedule, kept because published recipes depend on it): a trainable
parameter gets no weight decay
iff its DDP name (``module.…``) contains ``bn``, ``ln``, ``bias`` or ``logit_scale``. Side effects kept on purpose:
BERT ``LayerNorm.weight`` and ResNet ``downsample.1.weight`` (a BatchNorm) *are* decayed.

Role rule (12.7): no decay for every tensor with fewer than 2 dimensions (biases, all norm scales, ``logit_scale``,
``class_embedding``) and for embeddings (``nn.Embedding`` tables, ``positional_embedding``); decay for the rest
(weight matrices, convolutions, projections).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from cn_clip.errors import ConfigError

WD_GROUPS = ("reference", "role")
_REFERENCE_NO_DECAY = ("bn", "ln", "bias", "logit_scale")
DDP_PREFIX = "module."


def reference_no_decay(name: str) -> bool:
    """The reference's test on the DDP-prefixed parameter name."""
    return any(part in name for part in _REFERENCE_NO_DECAY)


def _embedding_param_names(model: nn.Module) -> set[str]:
    names = {f"{mod_name}.weight" for mod_name, mod in model.named_modules() if isinstance(mod, nn.Embedding)}
    names |= {name for name, _ in model.named_parameters() if name.endswith("positional_embedding")}
    return names


def split_decay(model: nn.Module, wd_groups: str = "reference") -> tuple[list[str], list[str]]:
    """Names (without prefix) of trainable parameters as ``(no_decay, decay)``, in ``named_parameters`` order."""
    if wd_groups not in WD_GROUPS:
        raise ConfigError(f"--wd-groups must be one of {WD_GROUPS}, got {wd_groups!r}")
    embeddings = _embedding_param_names(model) if wd_groups == "role" else set()
    no_decay, decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if wd_groups == "reference":
            skip = reference_no_decay(DDP_PREFIX + name)
        else:
            skip = param.ndim < 2 or name in embeddings
        (no_decay if skip else decay).append(name)
    return no_decay, decay


def param_groups(
    model: nn.Module, weight_decay: float, wd_groups: str = "reference", lr_scales: dict[str, float] | None = None
) -> list[dict]:
    """``[{no-decay params, weight_decay 0}, {decay params, weight_decay}]`` — the reference's group order, so
    optimizer state dicts line up with the reference's. With ``lr_scales`` (``--layer-decay``) each of the two is
    split further by learning-rate multiplier (``lr_scale``, applied by the engine); missing names get 1."""
    params = dict(model.named_parameters())
    no_decay, decay = split_decay(model, wd_groups)
    if lr_scales is None:
        return [
            {"params": [params[n] for n in no_decay], "weight_decay": 0.0},
            {"params": [params[n] for n in decay], "weight_decay": weight_decay},
        ]
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for names, wd in ((no_decay, 0.0), (decay, weight_decay)):
        for name in names:
            groups.setdefault((wd, lr_scales.get(name, 1.0)), []).append(params[name])
    return [{"params": ps, "weight_decay": wd, "lr_scale": scale} for (wd, scale), ps in groups.items()]


def create_optimizer(
    groups: Iterable[dict], lr: float, betas: tuple[float, float], eps: float
) -> torch.optim.Optimizer:
    return torch.optim.AdamW(list(groups), lr=lr, betas=betas, eps=eps)


def default_hparams(vision_model: str) -> tuple[float, tuple[float, float], float]:
    """Per-model defaults for ``--lr``, ``--beta1/2``, ``--eps`` when not given (compatibility.md#training-flags)."""
    if vision_model.startswith("RN"):
        return 5.0e-4, (0.9, 0.999), 1.0e-8
    if vision_model in ("ViT-L-14", "ViT-L-14-336"):
        return 4.0e-4, (0.9, 0.98), 1.0e-6
    return 5.0e-4, (0.9, 0.98), 1.0e-6
