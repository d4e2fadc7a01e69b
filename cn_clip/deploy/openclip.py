"""Convert between our checkpoints and open_clip's (``python -m cn_clip.convert from-open-clip|to-open-clip``).

open_clip models with a Hugging Face text tower (``xlm-roberta-base-ViT-B-32``, ``xlm-roberta-large-ViT-H-14``,
``roberta-ViT-B-32``) share our keys; open_clip's plain CLIP (e.g. ``ViT-B-32``) keeps OpenAI's text transformer,
which we hold as a Hugging Face ``CLIPTextModel`` tower (key map: :mod:`cn_clip.models.clip_layouts`).
``to-open-clip`` writes the weights and the open_clip model config that rebuilds the same network.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from cn_clip.errors import ConfigError
from cn_clip.models.config import CLIPCfg

_logger = logging.getLogger(__name__)
OPEN_CLIP_WEIGHTS = "open_clip_pytorch_model.bin"
OPEN_CLIP_CONFIG = "open_clip_config.json"
# our pooler → open_clip's hf_pooler_type ("cls_pooler" there reads BERT's pooler layer, which we do not build)
_POOLER_NAMES = {"mean": "mean_pooler", "cls": "cls_last_hidden_state_pooler"}


def resolve_architecture(arch: str) -> str:
    """Our ``vision@text`` for an open_clip model name (``xlm-roberta-base-ViT-B-32``) or ours as given."""
    from cn_clip.models.clip_layouts import OPEN_CLIP_ARCHITECTURES

    return OPEN_CLIP_ARCHITECTURES.get(arch, arch)


def open_clip_model_config(cfg: CLIPCfg) -> dict[str, Any]:
    """open_clip's model config (``model_configs/*.json`` format) of the network ``cfg`` describes."""
    from cn_clip.models.text import load_hf_text_config

    vision = cfg.vision
    if vision.kind != "vit":
        raise ConfigError(f"{cfg.name}: only ViT image towers convert to open_clip")
    if cfg.text.kind != "hf":
        raise ConfigError(f"{cfg.name}: a BERT (Chinese-CLIP) text tower has no open_clip counterpart")
    vision_cfg = {
        "image_size": vision.image_resolution,
        "layers": vision.vision_layers,
        "width": vision.vision_width,
        "head_width": vision.vision_head_width,
        "patch_size": vision.vision_patch_size,
    }
    text = cfg.text
    hf_config = load_hf_text_config(text.hf_model)
    if hf_config.model_type == "clip_text_model":
        if text.pooler != "eos" or text.proj != "linear":
            raise ConfigError(f"{cfg.name}: open_clip's CLIP text tower pools the end token into a linear projection")
        if hf_config.hidden_act != vision.vision_act:
            raise ConfigError(
                f"{cfg.name}: open_clip uses one activation for both towers (text {hf_config.hidden_act})"
            )
        text_cfg: dict[str, Any] = {
            "context_length": hf_config.max_position_embeddings,
            "vocab_size": hf_config.vocab_size,
            "width": hf_config.hidden_size,
            "heads": hf_config.num_attention_heads,
            "layers": hf_config.num_hidden_layers,
            "hf_tokenizer_name": text.hf_model,
        }
    else:
        if text.pooler not in _POOLER_NAMES:
            raise ConfigError(f"{cfg.name}: pooler {text.pooler!r} has no open_clip counterpart (use mean or cls)")
        text_cfg = {
            "hf_model_name": text.hf_model,
            "hf_tokenizer_name": text.hf_model,
            "hf_pooler_type": _POOLER_NAMES[text.pooler],
            "hf_proj_type": None if text.proj == "none" else text.proj,
            "context_length": text.context_length,
        }
    config: dict[str, Any] = {"embed_dim": cfg.embed_dim, "vision_cfg": vision_cfg, "text_cfg": text_cfg}
    if vision.vision_act == "quick_gelu":
        config["quick_gelu"] = True
    return config


def checkpoint_to_open_clip(checkpoint: str | Path, out_dir: str | Path, arch: str, overwrite: bool = False) -> Path:
    """Our checkpoint → ``OUT_DIR/open_clip_pytorch_model.bin`` + ``open_clip_config.json``, atomically.

    Load it in open_clip with ``add_model_config(OUT_DIR/open_clip_config.json)`` and
    ``create_model("open_clip_config", pretrained=OUT_DIR/open_clip_pytorch_model.bin)``.
    """
    import torch

    from cn_clip.fileio import atomic_dir
    from cn_clip.models.clip_layouts import to_plain_open_clip
    from cn_clip.models.factory import create_model

    model = create_model(resolve_architecture(arch), checkpoint)
    config = open_clip_model_config(model.cfg)
    state = model.state_dict()
    if "hf_model_name" not in config["text_cfg"]:
        state = to_plain_open_clip(state)
    if Path(out_dir).exists() and not overwrite:
        raise ConfigError(f"{out_dir} already exists (pass --overwrite to replace it)")
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        torch.save({k: v.contiguous() for k, v in state.items()}, tmp / OPEN_CLIP_WEIGHTS)
        (tmp / OPEN_CLIP_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return Path(out_dir)


def open_clip_to_checkpoint(source: str | Path, checkpoint: str | Path, arch: str) -> Path:
    """An open_clip checkpoint (training file or bare state dict, ``.bin``/``.pt``/``.safetensors``) → our
    checkpoint (``module.`` keys, ``epoch``/``step``/``name``), strictly checked against ``arch``, atomically."""
    from cn_clip.fileio import atomic_torch_save
    from cn_clip.models.factory import create_model

    model = create_model(resolve_architecture(arch), source)
    payload = {
        "epoch": 0,
        "step": 0,
        "name": f"converted from open_clip {Path(source).name}",
        "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()},
    }
    atomic_torch_save(payload, checkpoint)
    return Path(checkpoint)
