"""Two-way conversion between reference checkpoints and transformers' ``ChineseCLIPModel`` folders.

Key map (ours → HF), ``i`` = layer index; everything else under ``bert.`` maps to ``text_model.`` unchanged:

    text_projection [H, E]                         text_projection.weight [E, H]          (transposed)
    logit_scale                                    logit_scale
    visual.proj [W, E]                             visual_projection.weight [E, W]        (transposed)
    visual.class_embedding                         vision_model.embeddings.class_embedding
    visual.positional_embedding                    vision_model.embeddings.position_embedding.weight
    visual.conv1.weight                            vision_model.embeddings.patch_embedding.weight
    visual.ln_pre.*                                vision_model.pre_layrnorm.*            (sic)
    visual.transformer.resblocks.i.attn.in_proj_{weight,bias} [3W, …]
                                                   vision_model.encoder.layers.i.self_attn.{q,k,v}_proj.* (split)
    visual.transformer.resblocks.i.attn.out_proj.* …self_attn.out_proj.*
    visual.transformer.resblocks.i.ln_{1,2}.*      …layer_norm{1,2}.*
    visual.transformer.resblocks.i.mlp.c_fc.*      …mlp.fc1.*
    visual.transformer.resblocks.i.mlp.c_proj.*    …mlp.fc2.*
    visual.ln_post.*                               vision_model.post_layernorm.*

HF computes the same features: the image feature is ``post_layernorm(token 0) @ visual_projection`` and the text
feature ``last_hidden_state[:, 0] @ text_projection`` (its text model has no pooler). The copy is exact, so a round
trip is bit-identical. The RN50 tower has no HF counterpart.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from cn_clip.errors import CheckpointError, ConfigError
from cn_clip.models.clip_layouts import block_to_hf, blocks_from_hf
from cn_clip.models.config import CLIPCfg

_logger = logging.getLogger(__name__)

HF_LOGIT_SCALE_INIT = 2.6592  # what the OFA-Sys HF configs carry; the trained value is in the weights
_VIT_LAYER = re.compile(r"^visual\.transformer\.resblocks\.(\d+)\.(.+)$")
_HF_VIT_LAYER = re.compile(r"^vision_model\.encoder\.layers\.(\d+)\.(.+)$")
_RENAMES = {
    "logit_scale": "logit_scale",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
}
_TRANSPOSED = {"text_projection": "text_projection.weight", "visual.proj": "visual_projection.weight"}
# Keys of released HF folders that our model does not have (pooler of an old export, non-persistent buffers).
_HF_IGNORED = re.compile(r"^text_model\.pooler\.|position_ids$")


def _no_resnet(cfg: CLIPCfg) -> None:
    if cfg.vision.kind == "resnet":
        raise ConfigError(
            f"{cfg.name or 'this model'}: the ResNet image tower has no Hugging Face ChineseCLIPModel counterpart "
            "(transformers only implements the ViT towers); use the reference checkpoint or ONNX instead"
        )
    if cfg.text.kind != "bert":
        raise ConfigError(
            f"{cfg.name or 'this model'}: ChineseCLIPModel holds a BERT text tower; a model with a Hugging Face "
            "text tower converts with `python -m cn_clip.convert to-open-clip`"
        )


# --------------------------------------------------------------------------------------------------------------------
# State dicts
# --------------------------------------------------------------------------------------------------------------------


def to_hf_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our (clean, un-prefixed) ViT state dict → ``ChineseCLIPModel`` keys. Every tensor is copied exactly."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith("bert."):
            out["text_model." + key[len("bert.") :]] = value.clone()
        elif key in _TRANSPOSED:
            out[_TRANSPOSED[key]] = value.t().contiguous()
        elif key in _RENAMES:
            out[_RENAMES[key]] = value.clone()
        elif match := _VIT_LAYER.match(key):
            out.update(block_to_hf(f"vision_model.encoder.layers.{match.group(1)}.", match.group(2), value, key))
        else:
            raise CheckpointError(f"no Hugging Face counterpart for key {key!r} (is this a ResNet checkpoint?)")
    return out


def from_hf_state_dict(hf_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``ChineseCLIPModel`` keys → ours (un-prefixed); inverse of :func:`to_hf_state_dict`."""
    renames = {v: k for k, v in _RENAMES.items()}
    transposed = {v: k for k, v in _TRANSPOSED.items()}
    out: dict[str, torch.Tensor] = {}
    layers: dict[tuple[int, str], torch.Tensor] = {}
    for key, value in hf_state.items():
        if _HF_IGNORED.search(key):
            continue
        if key.startswith("text_model."):
            out["bert." + key[len("text_model.") :]] = value.clone()
        elif key in transposed:
            out[transposed[key]] = value.t().contiguous()
        elif key in renames:
            out[renames[key]] = value.clone()
        elif match := _HF_VIT_LAYER.match(key):
            layers[(int(match.group(1)), match.group(2))] = value
        else:
            raise CheckpointError(f"unexpected Hugging Face key {key!r} (not a ChineseCLIPModel?)")
    out.update(blocks_from_hf(layers, "visual.transformer.resblocks."))
    return out


def reference_order(state: dict[str, torch.Tensor], cfg: CLIPCfg) -> dict[str, torch.Tensor]:
    """``state`` in our model's (= the reference's) key order; keys must match the architecture exactly."""
    from cn_clip.models.clip_model import CLIP

    with torch.device("meta"):
        expected = list(CLIP(cfg).state_dict())
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or extra:
        raise CheckpointError(f"converted keys do not fit {cfg.name}: missing {missing[:8]}, unexpected {extra[:8]}")
    return {key: state[key] for key in expected}


# --------------------------------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------------------------------


def hf_config(cfg: CLIPCfg) -> Any:
    """The ``ChineseCLIPConfig`` of a ViT architecture."""
    from transformers import ChineseCLIPConfig

    _no_resnet(cfg)
    vision, text = cfg.vision, cfg.text
    text_config = {
        "vocab_size": text.vocab_size,
        "hidden_size": text.text_hidden_size,
        "num_hidden_layers": text.text_num_hidden_layers,
        "num_attention_heads": text.text_num_attention_heads,
        "intermediate_size": text.text_intermediate_size,
        "hidden_act": text.text_hidden_act,
        "hidden_dropout_prob": text.text_hidden_dropout_prob,
        "attention_probs_dropout_prob": text.text_attention_probs_dropout_prob,
        "max_position_embeddings": text.text_max_position_embeddings,
        "type_vocab_size": text.text_type_vocab_size,
        "initializer_range": text.text_initializer_range,
        "layer_norm_eps": text.text_layer_norm_eps,
        "pad_token_id": 0,
    }
    vision_config = {
        "hidden_size": vision.vision_width,
        "intermediate_size": 4 * vision.vision_width,
        "projection_dim": vision.embed_dim,
        "num_hidden_layers": vision.vision_layers,
        "num_attention_heads": vision.heads,
        "num_channels": 3,
        "image_size": vision.image_resolution,
        "patch_size": vision.vision_patch_size,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
    }
    return ChineseCLIPConfig(
        text_config=text_config,
        vision_config=vision_config,
        projection_dim=vision.embed_dim,
        logit_scale_init_value=HF_LOGIT_SCALE_INIT,
    )


def clip_cfg_from_hf(config: Any, name: str = "from-hf") -> CLIPCfg:
    """Our :class:`CLIPCfg` for a ``ChineseCLIPConfig``; settings our towers cannot express are an error."""
    from cn_clip.models.registry import config_from_flat_dict

    vision, text = config.vision_config, config.text_config
    if vision.hidden_act != "quick_gelu" or vision.intermediate_size != 4 * vision.hidden_size:
        raise ConfigError(f"{name}: vision tower with {vision.hidden_act} / MLP {vision.intermediate_size} unsupported")
    flat = {
        "embed_dim": config.projection_dim,
        "image_resolution": vision.image_size,
        "vision_layers": vision.num_hidden_layers,
        "vision_width": vision.hidden_size,
        "vision_patch_size": vision.patch_size,
        "vision_head_width": vision.hidden_size // vision.num_attention_heads,
        "vocab_size": text.vocab_size,
        "text_hidden_size": text.hidden_size,
        "text_intermediate_size": text.intermediate_size,
        "text_num_attention_heads": text.num_attention_heads,
        "text_num_hidden_layers": text.num_hidden_layers,
        "text_attention_probs_dropout_prob": text.attention_probs_dropout_prob,
        "text_hidden_act": text.hidden_act,
        "text_hidden_dropout_prob": text.hidden_dropout_prob,
        "text_initializer_range": text.initializer_range,
        "text_max_position_embeddings": text.max_position_embeddings,
        "text_type_vocab_size": text.type_vocab_size,
        "text_layer_norm_eps": text.layer_norm_eps,
    }
    return config_from_flat_dict(flat, name)


def image_processor(resolution: int) -> Any:
    """HF image processor equal to ``image_transform(resolution)``: squash to (R, R) bicubic, no crop, CLIP stats.

    HF's default for Chinese-CLIP is shortest-edge resize + centre crop, which the released weights never saw.
    """
    from transformers import ChineseCLIPImageProcessor

    from cn_clip.transforms import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    return ChineseCLIPImageProcessor(
        do_resize=True,
        size={"height": resolution, "width": resolution},
        resample=3,  # PIL.Image.BICUBIC
        do_center_crop=False,
        crop_size={"height": resolution, "width": resolution},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(OPENAI_CLIP_MEAN),
        image_std=list(OPENAI_CLIP_STD),
        do_convert_rgb=True,
    )


# --------------------------------------------------------------------------------------------------------------------
# Folders and files
# --------------------------------------------------------------------------------------------------------------------


def _write_processor(out: Path, resolution: int) -> None:
    """Tokenizer files (incl. ``vocab.txt``), ``preprocessor_config.json`` and the processor config."""
    from transformers import BertTokenizer, ChineseCLIPProcessor

    from cn_clip.tokenizer import VOCAB_PATH

    vocab_dir = out / ".vocab"
    vocab_dir.mkdir()
    shutil.copyfile(VOCAB_PATH, vocab_dir / "vocab.txt")
    # transformers 5 ignores BertTokenizer(vocab_file=...); from_pretrained reads the folder's vocab.txt.
    tokenizer = BertTokenizer.from_pretrained(str(vocab_dir), do_lower_case=True, model_max_length=512)
    processor = image_processor(resolution)
    ChineseCLIPProcessor(image_processor=processor, tokenizer=tokenizer).save_pretrained(str(out))
    processor.save_pretrained(str(out))  # preprocessor_config.json, read by transformers 4.x and 5.x alike
    shutil.copyfile(VOCAB_PATH, out / "vocab.txt")
    shutil.rmtree(vocab_dir)


def save_hf_folder(
    state: Mapping[str, torch.Tensor], cfg: CLIPCfg, out_dir: str | Path, overwrite: bool = False
) -> Path:
    """Write ``config.json``, ``model.safetensors``, tokenizer and processor files into ``out_dir`` atomically."""
    from safetensors.torch import save_file

    from cn_clip.fileio import atomic_dir
    from cn_clip.weights import clean_state_dict

    _no_resnet(cfg)
    if Path(out_dir).exists() and not overwrite:
        raise ConfigError(f"{out_dir} already exists (pass --overwrite to replace it)")
    clean = reference_order(clean_state_dict(state), cfg)
    hf_state = to_hf_state_dict(clean)
    config = hf_config(cfg)
    _check_hf_keys(hf_state, config)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        config.save_pretrained(str(tmp))
        save_file({k: v.contiguous() for k, v in hf_state.items()}, str(tmp / "model.safetensors"), {"format": "pt"})
        _write_processor(tmp, cfg.vision.image_resolution)
    return Path(out_dir)


def _check_hf_keys(hf_state: Mapping[str, torch.Tensor], config: Any) -> None:
    from transformers import ChineseCLIPModel

    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in ChineseCLIPModel(config).state_dict().items()}
    have = {k: tuple(v.shape) for k, v in hf_state.items()}
    if have != expected:
        diff = sorted(set(have.items()) ^ set(expected.items()))
        raise CheckpointError(f"converted state does not fit ChineseCLIPModel: {diff[:8]}")


def read_hf_state(hf_dir: Path) -> dict[str, torch.Tensor]:
    """Weights of an HF folder: ``model.safetensors``, a sharded safetensors index, or ``pytorch_model.bin``."""
    from safetensors.torch import load_file

    if (hf_dir / "model.safetensors").is_file():
        return load_file(str(hf_dir / "model.safetensors"))
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())):
            state.update(load_file(str(hf_dir / shard)))
        return state
    if (hf_dir / "pytorch_model.bin").is_file():
        return torch.load(hf_dir / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise CheckpointError(f"{hf_dir}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def load_hf_folder(hf_dir: str | Path) -> tuple[dict[str, torch.Tensor], CLIPCfg]:
    """Our state dict (reference key order, no prefix) and config from a ``ChineseCLIPModel`` folder."""
    from transformers import ChineseCLIPConfig

    hf_dir = Path(hf_dir)
    if not (hf_dir / "config.json").is_file():
        raise CheckpointError(f"{hf_dir}: not a Hugging Face model folder (no config.json)")
    config = ChineseCLIPConfig.from_pretrained(str(hf_dir))
    cfg = clip_cfg_from_hf(config, name=str(hf_dir))
    return reference_order(from_hf_state_dict(read_hf_state(hf_dir)), cfg), cfg


def checkpoint_to_hf(
    checkpoint: str | Path, out_dir: str | Path, arch: str | None = None, overwrite: bool = False
) -> Path:
    """Reference checkpoint file → HF folder; the architecture is inferred from the shapes unless given."""
    from cn_clip.models.factory import infer_architecture, resolve_config
    from cn_clip.weights import clean_state_dict, read_checkpoint, state_dict_of

    state = clean_state_dict(state_dict_of(read_checkpoint(checkpoint), str(checkpoint)))
    cfg = resolve_config(arch or infer_architecture(state))
    return save_hf_folder(state, cfg, out_dir, overwrite)


def hf_to_checkpoint(hf_dir: str | Path, checkpoint: str | Path) -> Path:
    """HF folder → reference checkpoint (``module.`` keys, ``epoch``/``step``/``name``, no optimizer), atomically."""
    from cn_clip.fileio import atomic_torch_save

    state, _ = load_hf_folder(hf_dir)
    payload = {
        "epoch": 0,
        "step": 0,
        "name": f"converted from {Path(hf_dir).name}",
        "state_dict": {f"module.{k}": v for k, v in state.items()},
    }
    atomic_torch_save(payload, checkpoint)
    return Path(checkpoint)
