"""Key layouts: OpenAI-style transformer blocks ↔ Hugging Face CLIP encoder layers, and open_clip checkpoints ↔ ours.

OpenAI's block keys (``ln_1``, ``attn.in_proj_*``, ``attn.out_proj``, ``ln_2``, ``mlp.c_fc``, ``mlp.c_proj``) map to
Hugging Face's CLIP layer keys (``layer_norm1``, ``self_attn.{q,k,v}_proj``, ``self_attn.out_proj``, ``layer_norm2``,
``mlp.fc1``, ``mlp.fc2``); the packed q/k/v rows split in three. ``deploy/hf.py`` uses it for ChineseCLIPModel's image
tower and this module for open_clip's plain text tower.

A CLIP with a Hugging Face text tower has the same keys in open_clip and here (``visual.*`` in OpenAI's ViT layout,
``text.transformer.*``, ``text.proj.*``, ``logit_scale``), so only non-persistent buffers differ. open_clip's plain
CLIP keeps OpenAI's text transformer at the top level; ours holds it as a Hugging Face ``CLIPTextModel`` tower
(``pooler: eos``, ``proj: linear``). Its map (open_clip → ours):

    token_embedding.weight                     text.transformer.[text_model.]embeddings.token_embedding.weight
    positional_embedding [L, W]                …embeddings.position_embedding.weight
    transformer.resblocks.i.*                  …encoder.layers.i.*                          (the block map above)
    ln_final                                   …final_layer_norm
    text_projection [W, E]                     text.proj.weight [E, W]                      (transposed)
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from cn_clip.errors import CheckpointError

LAYER_RENAMES = {
    "attn.out_proj.weight": "self_attn.out_proj.weight",
    "attn.out_proj.bias": "self_attn.out_proj.bias",
    "ln_1.weight": "layer_norm1.weight",
    "ln_1.bias": "layer_norm1.bias",
    "ln_2.weight": "layer_norm2.weight",
    "ln_2.bias": "layer_norm2.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight",
    "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight",
    "mlp.c_proj.bias": "mlp.fc2.bias",
}
_HF_QKV = re.compile(r"^self_attn\.([qkv])_proj\.(weight|bias)$")


def block_to_hf(prefix: str, rest: str, value: torch.Tensor, key: str) -> dict[str, torch.Tensor]:
    """One OpenAI block tensor (``rest`` = its key inside the block) → Hugging Face layer keys under ``prefix``."""
    if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
        kind = rest.rsplit("_", 1)[1]
        parts = zip("qkv", value.chunk(3, dim=0), strict=True)
        return {f"{prefix}self_attn.{n}_proj.{kind}": part.clone() for n, part in parts}
    if rest not in LAYER_RENAMES:
        raise CheckpointError(f"no Hugging Face counterpart for key {key!r}")
    return {prefix + LAYER_RENAMES[rest]: value.clone()}


def blocks_from_hf(layers: Mapping[tuple[int, str], torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Hugging Face layer tensors keyed ``(index, key inside the layer)`` → OpenAI block keys under ``prefix``
    (``{prefix}{index}.…``), q/k/v packed back into ``attn.in_proj_*``."""
    inverse = {v: k for k, v in LAYER_RENAMES.items()}
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for (index, rest), value in layers.items():
        if attn := _HF_QKV.match(rest):
            qkv.setdefault((index, attn.group(2)), {})[attn.group(1)] = value
        elif rest in inverse:
            out[f"{prefix}{index}.{inverse[rest]}"] = value.clone()
        else:
            raise CheckpointError(f"layer {index}: unexpected Hugging Face key {rest!r}")
    for (index, kind), parts in qkv.items():
        if sorted(parts) != ["k", "q", "v"]:
            raise CheckpointError(f"layer {index}: q/k/v {kind} incomplete (have {sorted(parts)})")
        out[f"{prefix}{index}.attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


# open_clip's pretrained multilingual / HF-text CLIPs → our "vision@text" (configs/*.json ship both towers).
OPEN_CLIP_ARCHITECTURES = {
    "xlm-roberta-base-ViT-B-32": "ViT-B-32-gelu@xlm-roberta-base",
    "xlm-roberta-large-ViT-H-14": "ViT-H-14-gelu@xlm-roberta-large",
    "roberta-ViT-B-32": "ViT-B-32@roberta-base",
}
_DROPPED = ("attn_mask",)  # open_clip's causal-mask buffer (persistent in old releases)
_BLOCK = re.compile(r"^transformer\.resblocks\.(\d+)\.(.+)$")


def is_plain_open_clip(state: Mapping[str, torch.Tensor]) -> bool:
    """True for open_clip's plain CLIP layout (OpenAI text transformer at the top level)."""
    return "token_embedding.weight" in state and "ln_final.weight" in state


def _hf_prefix(text_model_keys: bool) -> str:
    return "text.transformer.text_model." if text_model_keys else "text.transformer."


def from_plain_open_clip(state: Mapping[str, torch.Tensor], text_model_keys: bool = False) -> dict[str, torch.Tensor]:
    """Map open_clip's top-level text transformer onto a ``CLIPTextModel`` tower (keys under ``text.``).

    ``text_model_keys``: the installed transformers nests ``CLIPTextModel``'s weights under ``text_model.``.
    """
    prefix = _hf_prefix(text_model_keys)
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key in _DROPPED:
            continue
        block = _BLOCK.match(key)
        if block:
            index, rest = block.groups()
            out.update(block_to_hf(f"{prefix}encoder.layers.{index}.", rest, value, key))
        elif key == "token_embedding.weight":
            out[f"{prefix}embeddings.token_embedding.weight"] = value
        elif key == "positional_embedding":
            out[f"{prefix}embeddings.position_embedding.weight"] = value
        elif key.startswith("ln_final."):
            out[f"{prefix}final_layer_norm.{key.removeprefix('ln_final.')}"] = value
        elif key == "text_projection":
            out["text.proj.weight"] = value.t().contiguous()
        elif key.startswith("text_projection."):
            raise CheckpointError(f"{key}: open_clip's linear text projection with a bias is not supported")
        else:
            out[key] = value
    return out


def to_plain_open_clip(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`from_plain_open_clip` (q/k/v merged back into ``in_proj_*``)."""
    text_model_keys = any(k.startswith("text.transformer.text_model.") for k in state)
    prefix = _hf_prefix(text_model_keys)
    layer_re = re.compile(rf"^{re.escape(prefix)}encoder\.layers\.(\d+)\.(.+)$")
    layers: dict[tuple[int, str], torch.Tensor] = {}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        layer = layer_re.match(key)
        if layer:
            layers[(int(layer.group(1)), layer.group(2))] = value
        elif key == f"{prefix}embeddings.token_embedding.weight":
            out["token_embedding.weight"] = value
        elif key == f"{prefix}embeddings.position_embedding.weight":
            out["positional_embedding"] = value
        elif key.startswith(f"{prefix}final_layer_norm."):
            out[f"ln_final.{key.rsplit('.', 1)[1]}"] = value
        elif key == "text.proj.weight":
            out["text_projection"] = value.t().contiguous()
        elif key.startswith("text."):
            raise CheckpointError(f"{key}: no counterpart in open_clip's plain CLIP text tower")
        else:
            out[key] = value
    out.update(blocks_from_hf(layers, "transformer.resblocks."))
    return out
