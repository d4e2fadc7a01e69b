"""Typed model configs. The JSON files keep the reference's flat key names; unknown keys are rejected."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cn_clip.errors import ConfigError


@dataclass(frozen=True)
class VisionCfg:
    """An image tower. ``vision_layers`` as a list means ModifiedResNet, as an int a ViT."""

    embed_dim: int
    image_resolution: int
    vision_layers: int | tuple[int, ...]
    vision_width: int
    vision_patch_size: int | None = None
    vision_head_width: int = 64
    vision_act: str = "quick_gelu"  # the ViT MLP activation: "quick_gelu" (OpenAI, the reference) or "gelu"

    def __post_init__(self) -> None:
        if self.vision_act not in ("quick_gelu", "gelu"):
            raise ValueError(f"vision_act {self.vision_act!r} is not 'quick_gelu' or 'gelu'")

    @property
    def kind(self) -> str:
        return "resnet" if isinstance(self.vision_layers, tuple) else "vit"

    @property
    def heads(self) -> int:
        if self.kind == "resnet":
            return self.vision_width * 32 // self.vision_head_width
        return self.vision_width // self.vision_head_width

    @property
    def grid_size(self) -> int:
        """Side of the final feature map: patches per side for a ViT, resolution/32 for a ResNet."""
        if self.kind == "resnet":
            return self.image_resolution // 32
        assert self.vision_patch_size is not None
        return self.image_resolution // self.vision_patch_size


@dataclass(frozen=True)
class TextCfg:
    """A BERT text tower (the reference's ``text_*`` keys)."""

    vocab_size: int
    text_hidden_size: int
    text_intermediate_size: int
    text_num_attention_heads: int
    text_num_hidden_layers: int
    text_attention_probs_dropout_prob: float = 0.1
    text_hidden_act: str = "gelu"
    text_hidden_dropout_prob: float = 0.1
    text_initializer_range: float = 0.02
    text_max_position_embeddings: int = 512
    text_type_vocab_size: int = 2
    text_layer_norm_eps: float = 1e-12

    @property
    def kind(self) -> str:
        return "bert"


HF_POOLERS = ("cls", "mean", "eos")
HF_PROJECTIONS = ("linear", "mlp", "none")


@dataclass(frozen=True)
class HFTextCfg:
    """A text tower built from any Hugging Face encoder: a local folder (config.json + tokenizer files, weights
    optional) or a hub id found in the local HF cache. ``pooler``: first token, masked mean or last real token;
    ``proj``: to ``embed_dim`` by one bias-free linear layer, a two-layer GELU MLP (open_clip's), or none."""

    hf_model: str
    pooler: str = "cls"
    proj: str = "linear"
    context_length: int = 77  # the tokenizer's default length when a caller names none

    def __post_init__(self) -> None:
        if self.pooler not in HF_POOLERS:
            raise ValueError(f"pooler {self.pooler!r} is not one of {', '.join(HF_POOLERS)}")
        if self.proj not in HF_PROJECTIONS:
            raise ValueError(f"proj {self.proj!r} is not one of {', '.join(HF_PROJECTIONS)}")
        if not isinstance(self.context_length, int) or self.context_length < 2:
            raise ValueError(f"context_length must be an integer >= 2, got {self.context_length!r}")

    @property
    def kind(self) -> str:
        return "hf"


@dataclass(frozen=True)
class CLIPCfg:
    """A vision × text pair, named ``"{vision}@{text}"`` like the reference."""

    vision: VisionCfg
    text: TextCfg | HFTextCfg
    name: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def embed_dim(self) -> int:
        return self.vision.embed_dim

    def to_flat_dict(self) -> dict[str, Any]:
        """The reference's merged ``model_info`` dict (vision keys, then text keys)."""
        flat = dataclasses.asdict(self.vision)
        if isinstance(self.vision.vision_layers, tuple):
            flat["vision_layers"] = list(self.vision.vision_layers)
        if self.vision.vision_act == "quick_gelu":
            del flat["vision_act"]  # the reference's model_info has no such key
        flat.update(dataclasses.asdict(self.text))
        return flat


def _parse_layers(value: Any, source: str) -> int | tuple[int, ...]:
    # The reference stores ResNet depths as the string "[3,4,6,3]"; parse it as JSON, never eval().
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{source}: vision_layers {value!r} is neither an int nor a JSON list") from exc
    if isinstance(value, list):
        return tuple(int(v) for v in value)
    if isinstance(value, int):
        return value
    raise ConfigError(f"{source}: vision_layers must be an int or a list, got {value!r}")


def _build(cls: type, data: dict[str, Any], source: str) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {', '.join(unknown)}; expected some of {', '.join(sorted(names))}")
    try:
        return cls(**data)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{source}: {exc}") from exc


def vision_cfg_from_dict(data: dict[str, Any], source: str = "<dict>") -> VisionCfg:
    data = dict(data)
    if "vision_layers" in data:
        data["vision_layers"] = _parse_layers(data["vision_layers"], source)
    return _build(VisionCfg, data, source)


def text_cfg_from_dict(data: dict[str, Any], source: str = "<dict>") -> TextCfg | HFTextCfg:
    """A BERT-shape tower (the reference's ``text_*`` keys) or, with ``hf_model``, a Hugging Face encoder."""
    return _build(HFTextCfg if "hf_model" in data else TextCfg, data, source)


def read_json_config(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except FileNotFoundError as exc:
        raise ConfigError(f"model config {path} does not exist") from exc
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a model config must be a JSON object")
    return data
