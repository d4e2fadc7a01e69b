"""The only place a CLIP is built and loaded: ``create_model``, ``load_from_name`` and the reference's ``load``."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cn_clip.errors import CheckpointError, ConfigError
from cn_clip.models.clip_model import CLIP, LOGIT_BIAS_KEY
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
    text_weights: bool = False,
) -> CLIP:
    """Build a CLIP (random init, or strictly loaded from ``checkpoint``: a path or a loaded dict), in eval mode.

    ``text_weights``: a Hugging Face text tower starts from the weights in its folder (when it has any)."""
    if checkpoint is None:
        cfg = resolve_config(name_or_cfg, input_resolution)
        _logger.debug("Model info %s", cfg.to_flat_dict())
        model = CLIP(cfg, text_weights=text_weights)
    else:
        model, _ = build_from_checkpoint(name_or_cfg, checkpoint, input_resolution)
    model.to(device or "cpu")
    dtype = weight_dtype(precision)  # amp/fp32: fp32 weights
    if dtype is not None:
        convert_weights(model, dtype)
    return model.eval()


def build_from_checkpoint(
    name_or_cfg: str | CLIPCfg,
    checkpoint: str | Path | Mapping[str, Any],
    input_resolution: int | None = None,
    source: str | None = None,
) -> tuple[CLIP, dict[str, Any]]:
    """An fp32 CLIP holding ``checkpoint``'s weights, built without random initialisation; returns the model and
    the checkpoint's non-tensor metadata.

    The model's parameters are built on the meta device and the strictly checked state dict is assigned to them
    (cast to fp32); buffers are built as usual (see :func:`_parameters_on_meta`).
    """
    raw, source = _raw_checkpoint(checkpoint, source)
    cfg = resolve_config(name_or_cfg, input_resolution)
    _logger.debug("Model info %s", cfg.to_flat_dict())
    with _parameters_on_meta():
        model = CLIP(cfg)
    load_state_dict_strict(model, _state_with_bias(model, raw, source), source, assign=True)
    return model, _metadata(raw)


def load_checkpoint_into(
    model: CLIP, checkpoint: str | Path | Mapping[str, Any], source: str | None = None
) -> dict[str, Any]:
    """Strictly copy a reference-format checkpoint (or flat state dict) into an existing model; returns its
    non-tensor metadata."""
    raw, source = _raw_checkpoint(checkpoint, source)
    load_state_dict_strict(model, _state_with_bias(model, raw, source), source)
    return _metadata(raw)


def _raw_checkpoint(checkpoint: str | Path | Mapping[str, Any], source: str | None = None) -> tuple[dict, str]:
    if isinstance(checkpoint, Mapping):
        return dict(checkpoint), source or "<checkpoint dict>"
    return read_checkpoint(checkpoint), source or str(checkpoint)


def _state_with_bias(model: CLIP, raw: Mapping[str, Any], source: str) -> dict[str, torch.Tensor]:
    """The checkpoint's state dict, fitted to ``model`` before the strict load: a checkpoint trained with
    ``--interpolate-positions`` grows the model's position table; a SigLIP checkpoint's extra ``logit_bias`` key
    becomes the model's bias (without it the model has none)."""
    state = clean_state_dict(state_dict_of(raw, source))
    if model.cfg.text.kind == "bert":
        fit_checkpoint_positions(model, state)
    bias = raw.get(LOGIT_BIAS_KEY) if "state_dict" in raw else None
    if bias is None:  # a flat dict (e.g. ``model.state_dict()`` of a SigLIP model) holds it among the tensors
        bias = state.get(LOGIT_BIAS_KEY)
    if bias is not None and not isinstance(bias, torch.Tensor | float):
        raise CheckpointError(f"{source}: '{LOGIT_BIAS_KEY}' is a {type(bias).__name__}, not a number")
    model.set_logit_bias(bias)
    if bias is not None:
        state[LOGIT_BIAS_KEY] = torch.as_tensor(bias).reshape(())
    return state


def _metadata(raw: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in raw.items() if k not in ("state_dict", "optimizer", LOGIT_BIAS_KEY)}


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Within the block, every parameter a module registers is moved to the meta device (no memory, and the
    initialisers that follow do no work) while buffers are built as usual: the ones no checkpoint holds (BERT's
    ``position_ids``) keep the values their constructors compute, whatever the transformers version. The switch is
    process-wide while the block runs (the approach of accelerate's ``init_empty_weights``): modules built by other
    threads at that moment would get meta parameters too."""
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and not param.is_meta:
            param = type(param)(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = register_on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


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
        model.text_tower.to(dtype)
    return model


def infer_architecture(state: Mapping[str, torch.Tensor]) -> str:
    """Find the registered ``vision@text`` whose keys and shapes equal those of a (cleaned) state dict."""
    state = clean_state_dict(state)
    if any(k.startswith("text.") for k in state) or "token_embedding.weight" in state:
        raise CheckpointError(
            "this checkpoint has a Hugging Face (or open_clip) text tower, whose architecture its shapes do not "
            "name: give vision_model_name/text_model_name (--vision-model/--text-model), e.g. ViT-B-32-gelu and "
            "xlm-roberta-base or hf:FOLDER"
        )
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    vision_keys = {k: s for k, s in shapes.items() if k.startswith("visual.") or k == "text_projection"}
    text_keys = _any_position_rows({k: s for k, s in shapes.items() if k.startswith("bert.")})
    bert_towers = _bert_towers()
    vision = _match_tower("vision", vision_keys, lambda v: f"{v}@{bert_towers[0]}", "visual.")
    text = _match_tower("text", text_keys, lambda t: f"{list_towers('vision')[0]}@{t}", "bert.", bert_towers)
    return f"{vision}@{text}"


def _any_position_rows(shapes: dict[str, tuple]) -> dict[str, tuple]:
    """A tower matches whatever its position-table rows (a checkpoint trained with --interpolate-positions)."""
    if POSITION_KEY in shapes:
        shapes[POSITION_KEY] = (None, *shapes[POSITION_KEY][1:])
    return shapes


def _bert_towers() -> list[str]:
    """Registered BERT-shape text towers (Hugging Face towers are skipped: building them may need files)."""
    from cn_clip.models.registry import get_tower_data

    return [t for t in list_towers("text") if "hf_model" not in get_tower_data(t)]


def _match_tower(
    kind: str, wanted: dict[str, tuple], arch: Callable[[str], str], prefix: str, towers: list[str] | None = None
) -> str:
    wanted = {k: s for k, s in wanted.items() if k.startswith(prefix)}
    for tower in towers if towers is not None else list_towers(kind):
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
        both = vision_model_name and text_model_name
        architecture = f"{vision_model_name}@{text_model_name}" if both else None
        resolution = input_resolution
    else:
        raise ConfigError(f"Model {name} not found; available models = {available_models()}")
    raw = read_checkpoint(path)
    if architecture is None:
        architecture = infer_architecture(state_dict_of(raw, str(path)))
        _logger.info("Inferred architecture %s from the shapes in %s", architecture, path)
    model, _ = build_from_checkpoint(architecture, raw, resolution, source=str(path))
    del raw
    model.to(device)
    if torch.device(device).type != "cpu":
        convert_weights(model)
    return model.eval(), image_transform(model.cfg.vision.image_resolution)


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
