"""open_clip checkpoints ↔ ours: key maps and the open_clip model names we know.

A CLIP with a Hugging Face text tower has the same keys in both (``visual.*`` in OpenAI's ViT layout,
``text.transformer.*``, ``text.proj.*``, ``logit_scale``), so only non-persistent buffers differ. open_clip's plain
CLIP keeps OpenAI's text transformer at the top level; ours holds it as a Hugging Face ``CLIPTextModel`` tower
(``pooler: eos``, ``proj: linear``). Its map (open_clip → ours):

    token_embedding.weight                     text.transformer.[text_model.]embeddings.token_embedding.weight
    positional_embedding [L, W]                …embeddings.position_embedding.weight
    transformer.resblocks.i.ln_1 / ln_2        …encoder.layers.i.layer_norm1 / layer_norm2
    transformer.resblocks.i.attn.in_proj_*     …encoder.layers.i.self_attn.{q,k,v}_proj.*   (split in three)
    transformer.resblocks.i.attn.out_proj      …encoder.layers.i.self_attn.out_proj
    transformer.resblocks.i.mlp.c_fc / c_proj  …encoder.layers.i.mlp.fc1 / fc2
    ln_final                                   …final_layer_norm
    text_projection [W, E]                     text.proj.weight [E, W]                      (transposed)
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from cn_clip.errors import CheckpointError

# open_clip's pretrained multilingual / HF-text CLIPs → our "vision@text" (configs/*.json ship both towers).
OPEN_CLIP_ARCHITECTURES = {
    "xlm-roberta-base-ViT-B-32": "ViT-B-32-gelu@xlm-roberta-base",
    "xlm-roberta-large-ViT-H-14": "ViT-H-14-gelu@xlm-roberta-large",
    "roberta-ViT-B-32": "ViT-B-32@roberta-base",
}
_DROPPED = ("attn_mask",)  # open_clip's causal-mask buffer (persistent in old releases)
_BLOCK = re.compile(r"^transformer\.resblocks\.(\d+)\.(.+)$")
_BLOCK_NAMES = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}


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
            layer = f"{prefix}encoder.layers.{index}."
            if rest.startswith("attn.in_proj_"):
                kind = rest.removeprefix("attn.in_proj_")
                for name, chunk in zip("qkv", value.chunk(3, dim=0), strict=True):
                    out[f"{layer}self_attn.{name}_proj.{kind}"] = chunk.clone()
                continue
            stem, _, kind = rest.rpartition(".")
            if stem not in _BLOCK_NAMES:
                raise CheckpointError(f"open_clip text key {key}: no CLIPTextModel counterpart")
            out[f"{layer}{_BLOCK_NAMES[stem]}.{kind}"] = value
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
    names = {v: k for k, v in _BLOCK_NAMES.items()}
    layer_re = re.compile(rf"^{re.escape(prefix)}encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        layer = layer_re.match(key)
        if layer:
            index, stem, kind = layer.groups()
            base = f"transformer.resblocks.{index}."
            if stem in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                if stem == "self_attn.q_proj":
                    parts = [state[key.replace(".q_proj.", f".{n}_proj.")] for n in "qkv"]
                    out[f"{base}attn.in_proj_{kind}"] = torch.cat(parts, dim=0)
                continue
            out[f"{base}{names[stem]}.{kind}"] = value
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
    return out
