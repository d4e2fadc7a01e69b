"""The only place a CLIP is built and loaded: ``create_model``, ``load_from_name`` and the reference's ``load``."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cn_clip.errors import CheckpointError, ConfigError
from cn_clip.models.clip_model import CLIP
from cn_clip.models.config import CLIPCfg
from cn_clip.models.layers import PackedSelfAttention
from cn_clip.models.positions import POSITION_KEY, fit_checkpoint_positions
from cn_clip.models.pretrained import PRETRAINED, available_models
from cn_clip.models.registry import get_model_config, list_towers
from cn_clip.runtime import resolve_device, weight_dtype
from cn_clip.weights import clean_state_dict, load_state_dict_strict, read_checkpoint, resize_pos_embed, state_dict_of

_logger = logging.getLogger(__name__)


def resolve_config(name_or_cfg: str | CLIPCfg, input_resolution: int | None = None) -> CLIPCfg:
    """A :class:`CLIPCfg` from ``"vision@text"``, a released short name (``"ViT-B-16"``) or a config."""
    if isinstance(name_or_cfg, CLIPCfg):
        cfg = name_or_cfg
    elif name_or_cfg in PRETRAINED:
        cfg = get_model_config(PRETRAINED[name_or_cfg].architecture)
    else:
        cfg = get_model_config(name_or_cfg)
    if input_resolution and input_resolution != cfg.vision.image_resolution:
        cfg = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, image_resolution=input_resolution))
    return cfg


def create_model(
    name_or_cfg: str | CLIPCfg,
    checkpoint: str | Path | Mapping[str, Any] | None = None,
    device: str | torch.device | None = None,
    precision: str = "fp32",
    input_resolution: int | None = None,
) -> CLIP:
    """Build a CLIP (random init, or strictly loaded from ``checkpoint``: a path or a loaded dict), in eval mode."""
    cfg = resolve_config(name_or_cfg, input_resolution)
    _logger.debug("Model info %s", cfg.to_flat_dict())
    model = CLIP(cfg)
    if checkpoint is not None:
        load_checkpoint_into(model, checkpoint)
    model.to(device or "cpu")
    dtype = weight_dtype(precision)  # amp/fp32: fp32 weights
    if dtype is not None:
        convert_weights(model, dtype)
    return model.eval()


def load_checkpoint_into(model: CLIP, checkpoint: str | Path | Mapping[str, Any]) -> dict[str, Any]:
    """Strictly load a reference-format checkpoint (or flat state dict); returns its non-tensor metadata."""
    if isinstance(checkpoint, Mapping):
        raw, source = dict(checkpoint), "<checkpoint dict>"
    else:
        raw, source = read_checkpoint(checkpoint), str(checkpoint)
    state = state_dict_of(raw, source)
    fit_checkpoint_positions(model, state)  # a checkpoint trained with --interpolate-positions
    load_state_dict_strict(model, state, source)
    return {k: v for k, v in raw.items() if k not in ("state_dict", "optimizer")}


def convert_weights(model: nn.Module, dtype: torch.dtype = torch.float16) -> nn.Module:
    """The reference's mixed precision: matmul weights and the whole BERT in ``dtype``; LayerNorms of the image
    tower, embeddings added to tokens, ``logit_scale`` and BatchNorms stay fp32."""
    for module in model.modules():
        if isinstance(module, nn.Conv1d | nn.Conv2d | nn.Linear):
            module.to(dtype)
        elif isinstance(module, PackedSelfAttention):
            module.in_proj_weight.data = module.in_proj_weight.data.to(dtype)
            module.in_proj_bias.data = module.in_proj_bias.data.to(dtype)
        for name in ("text_projection", "proj"):
            param = getattr(module, name, None)
            if isinstance(param, nn.Parameter):
                param.data = param.data.to(dtype)
    if isinstance(model, CLIP):
        model.bert.to(dtype)
    return model


def infer_architecture(state: Mapping[str, torch.Tensor]) -> str:
    """Find the registered ``vision@text`` whose keys and shapes equal those of a (cleaned) state dict."""
    state = clean_state_dict(state)
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    vision_keys = {k: s for k, s in shapes.items() if k.startswith("visual.") or k == "text_projection"}
    text_keys = _any_position_rows({k: s for k, s in shapes.items() if k.startswith("bert.")})
    vision = _match_tower("vision", vision_keys, lambda v: f"{v}@{list_towers('text')[0]}", "visual.")
    text = _match_tower("text", text_keys, lambda t: f"{list_towers('vision')[0]}@{t}", "bert.")
    return f"{vision}@{text}"


def _any_position_rows(shapes: dict[str, tuple]) -> dict[str, tuple]:
    """A tower matches whatever its position-table rows (a checkpoint trained with --interpolate-positions)."""
    if POSITION_KEY in shapes:
        shapes[POSITION_KEY] = (None, *shapes[POSITION_KEY][1:])
    return shapes


def _match_tower(kind: str, wanted: dict[str, tuple], arch: Callable[[str], str], prefix: str) -> str:
    wanted = {k: s for k, s in wanted.items() if k.startswith(prefix)}
    for tower in list_towers(kind):
        with torch.device("meta"):
            model = CLIP(get_model_config(arch(tower)))
        have = _any_position_rows({k: tuple(v.shape) for k, v in model.state_dict().items() if k.startswith(prefix)})
        if have == wanted:
            return tower
    raise CheckpointError(
        f"no registered {kind} tower matches this checkpoint's {prefix}* keys; pass vision_model_name/"
        "text_model_name or register a config with cn_clip.models.registry.add_model_config"
    )


def released_file(name: str, download_root: str | None = None, use_modelscope: bool = False) -> Path:
    """The verified local path of released model ``name`` in ``download_root`` (default ``~/.cache/clip``),
    downloaded first if needed; safe to call from several processes sharing the cache (see :mod:`cn_clip.hub`)."""
    from cn_clip.hub import DEFAULT_CACHE, download

    info = PRETRAINED[name]
    urls = info.urls
    if use_modelscope:
        urls = [urls[1], urls[0], urls[2]]
    root = Path(download_root or DEFAULT_CACHE).expanduser()
    return download(urls, root / info.filename, info.sha256, info.size_bytes)


def load_from_name(
    name: str,
    device: str | torch.device | None = None,
    download_root: str | None = None,
    vision_model_name: str | None = None,
    text_model_name: str | None = None,
    input_resolution: int | None = None,
    use_modelscope: bool = False,
) -> tuple[CLIP, Callable]:
    """``(model, preprocess)`` for a released name or a local checkpoint path; the model is in eval mode.

    On CPU the weights stay fp32; on an accelerator they get the reference's mixed fp16 (see
    :func:`convert_weights`). For a local file the architecture is inferred from its shapes unless given.
    """
    from cn_clip.transforms import image_transform

    device = resolve_device(device, per_rank=False)
    if name in PRETRAINED:
        path = released_file(name, download_root, use_modelscope)
        architecture, resolution = PRETRAINED[name].architecture, PRETRAINED[name].resolution
    elif Path(name).expanduser().is_file():
        path = Path(name).expanduser()
        architecture, resolution = _local_architecture(path, vision_model_name, text_model_name, input_resolution)
    else:
        raise ConfigError(f"Model {name} not found; available models = {available_models()}")
    raw = read_checkpoint(path)
    model = create_model(architecture, input_resolution=resolution)
    load_checkpoint_into(model, raw)
    model.to(device)
    if torch.device(device).type != "cpu":
        convert_weights(model)
    return model.eval(), image_transform(model.cfg.vision.image_resolution)


def _local_architecture(
    path: Path, vision: str | None, text: str | None, resolution: int | None
) -> tuple[str, int | None]:
    if vision and text:
        return f"{vision}@{text}", resolution
    architecture = infer_architecture(state_dict_of(read_checkpoint(path), str(path)))
    _logger.info("Inferred architecture %s from the shapes in %s", architecture, path)
    return architecture, resolution


def load(
    model: CLIP,
    device: str | torch.device = "cpu",
    clip_path: str | None = None,
    bert_path: str | None = None,
    use_flash_attention: bool = False,
) -> CLIP:
    """Reference API: initialise the image tower (+ ``logit_scale``) from a flat CLIP dict and/or BERT from a flat
    BERT dict (partial init for training). Keys that do not fit are reported, not silently dropped."""
    del use_flash_attention  # SDPA is always used; the flag changes no weights
    merged: dict[str, torch.Tensor] = {}
    if clip_path:
        clip_state = clean_state_dict(state_dict_of(read_checkpoint(clip_path), clip_path))
        merged.update({k: v for k, v in clip_state.items() if k.startswith("visual") or k == "logit_scale"})
    if bert_path:
        bert_state = clean_state_dict(state_dict_of(read_checkpoint(bert_path), bert_path))
        merged.update({k: v for k, v in bert_state.items() if k.startswith("bert")})
    if merged:
        load_partial(model, merged, " + ".join(p for p in (clip_path, bert_path) if p))
    return model.to(device)


def load_partial(model: CLIP, state: dict[str, torch.Tensor], source: str) -> None:
    """Load a subset of keys; unknown or mis-shaped keys are an error, untouched model keys are logged."""
    resize_pos_embed(state, model)
    expected = model.state_dict()
    unexpected = [k for k in state if k not in expected]
    mismatched = [k for k in state if k in expected and expected[k].shape != state[k].shape]
    if unexpected or mismatched:
        raise CheckpointError(f"{source}: keys not in the model {unexpected[:8]}, shape mismatches {mismatched[:8]}")
    model.load_state_dict(state, strict=False)
    untouched = len(expected) - len(state)
    _logger.info("Initialised %d tensors from %s (%d left at their initial values)", len(state), source, untouched)
