"""Partial unlocking and layer-wise learning-rate decay: both towers as ordered groups of parameter names.

Image groups follow open_clip's ``lock_image_tower``. ViT: ``[conv1, class_embedding, positional_embedding,
ln_pre]``, blocks 0…L−2, ``[block L−1, ln_post]``, ``[proj]``. ModifiedResNet: the stem, ``layer1``…``layer4``,
``attnpool``. Text groups: the embeddings, then each encoder layer; ``text_projection`` stands apart.
"""

from __future__ import annotations

import logging

from torch import nn

from cn_clip.errors import ConfigError

_logger = logging.getLogger(__name__)


def _names(module: nn.Module, prefix: str) -> list[str]:
    return [f"{prefix}.{name}" for name, _ in module.named_parameters()]


def image_groups(model: nn.Module) -> list[list[str]]:
    """The image tower's parameter names (``visual.…``), in groups from input to output."""
    visual = model.visual
    if model.is_vit:
        blocks = [
            _names(block, f"visual.transformer.resblocks.{i}") for i, block in enumerate(visual.transformer.resblocks)
        ]
        stem = [
            "visual.conv1.weight",
            "visual.class_embedding",
            "visual.positional_embedding",
            *_names(visual.ln_pre, "visual.ln_pre"),
        ]
        return [stem, *blocks[:-1], blocks[-1] + _names(visual.ln_post, "visual.ln_post"), ["visual.proj"]]  # fmt: skip
    stem = [f"visual.{part}.{name}" for part in ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3")
            for name, _ in getattr(visual, part).named_parameters()]  # fmt: skip
    layers = [_names(getattr(visual, f"layer{i}"), f"visual.layer{i}") for i in range(1, 5)]
    return [stem, *layers, _names(visual.attnpool, "visual.attnpool")]


def text_groups(model: nn.Module) -> list[list[str]]:
    """BERT's parameter names (``bert.…``): the embeddings, then each encoder layer."""
    if model.cfg.text.kind != "bert":
        raise ConfigError("layer groups (--lock-text-unlocked-layers, --layer-decay) need a BERT text tower")
    bert = model.bert
    layers = [_names(layer, f"bert.encoder.layer.{i}") for i, layer in enumerate(bert.encoder.layer)]
    return [_names(bert.embeddings, "bert.embeddings"), *layers]


def lock_towers(model: nn.Module, text_unlocked_layers: int | None, image_unlocked_groups: int | None) -> None:
    """Freeze each tower except its last N groups (``None`` leaves the tower alone)."""
    for flag, unlocked, tower_groups in (
        ("--lock-text-unlocked-layers", text_unlocked_layers, text_groups),
        ("--lock-image-unlocked-groups", image_unlocked_groups, image_groups),
    ):
        if unlocked is None:
            continue
        groups = tower_groups(model)
        if not 0 <= unlocked <= len(groups):
            raise ConfigError(f"{flag} {unlocked}: this tower has {len(groups)} groups, use 0…{len(groups)}")
        for names in groups[: len(groups) - unlocked]:
            for name in names:
                model.get_parameter(name).requires_grad = False
        _logger.info("%s %d: the last %d of %d groups train", flag, unlocked, unlocked, len(groups))


def layer_scales(model: nn.Module, decay: float) -> dict[str, float]:
    """Learning-rate multiplier per parameter name: ``decay ** (groups after it)`` within its tower. The last image
    group (the projection), ``text_projection`` and ``logit_scale`` train at the full rate; the last BERT layer at
    ``decay``."""
    scales: dict[str, float] = {}
    for groups, top in ((image_groups(model), 1), (text_groups(model), 0)):
        depth = len(groups) - 1 + (1 - top)  # text: text_projection is the group above the last layer
        for index, names in enumerate(groups):
            for name in names:
                scales[name] = decay ** (depth - index)
    return scales
