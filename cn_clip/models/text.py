"""Text towers: the reference's BERT (``transformers.BertModel``, SDPA, no pooler) and any Hugging Face encoder."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cn_clip.errors import ConfigError
from cn_clip.models.config import HFTextCfg, TextCfg

_logger = logging.getLogger(__name__)

# Why ``use_flash_attention`` / ``--use-flash-attention`` select nothing here (docs/compatibility.md#flash-attention).
SDPA_NOTE = (
    "attention always runs through PyTorch's scaled_dot_product_attention (SDPA), which already selects the "
    "FlashAttention kernel on a GPU when the inputs allow it; no kernel, weight or key layout changes"
)


def create_bert(cfg: TextCfg) -> nn.Module:
    """A post-LN BERT whose state-dict keys (under ``bert.``) are the reference's."""
    from transformers import BertConfig, BertModel

    bert_cfg = BertConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.text_hidden_size,
        num_hidden_layers=cfg.text_num_hidden_layers,
        num_attention_heads=cfg.text_num_attention_heads,
        intermediate_size=cfg.text_intermediate_size,
        hidden_act=cfg.text_hidden_act,
        hidden_dropout_prob=cfg.text_hidden_dropout_prob,
        attention_probs_dropout_prob=cfg.text_attention_probs_dropout_prob,
        max_position_embeddings=cfg.text_max_position_embeddings,
        type_vocab_size=cfg.text_type_vocab_size,
        initializer_range=cfg.text_initializer_range,
        layer_norm_eps=cfg.text_layer_norm_eps,
        pad_token_id=0,
    )
    bert_cfg._attn_implementation = "sdpa"
    bert = BertModel(bert_cfg, add_pooling_layer=False)
    return bert


def trim_padding(text: torch.Tensor, pad_id: int = 0) -> torch.Tensor:
    """Drop the columns after the longest sequence in the batch: padding is masked, so the [CLS] output is unchanged
    and the work shrinks from ``B·ctx`` to ``B·max_len`` tokens."""
    if text.numel() == 0:
        return text
    used = (text != pad_id).any(dim=0).nonzero()
    longest = int(used[-1]) + 1 if used.numel() else 1
    return text[:, :longest]


# --------------------------------------------------------------------------------------------------------------------
# Text towers from any Hugging Face encoder
# --------------------------------------------------------------------------------------------------------------------

HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def resolve_hf_folder(hf_model: str) -> Path:
    """The local folder of ``hf_model``: a directory, or a hub id already in the local Hugging Face cache (nothing
    is downloaded here; a missing id is an error that says how to fetch it)."""
    path = Path(hf_model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"hf_model {hf_model}: the folder has no config.json")
        return path
    if path.exists() or hf_model.startswith((".", "/", "~")):
        raise ConfigError(f"hf_model {hf_model}: not a folder")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(hf_model, local_files_only=True))
    except (LocalEntryNotFoundError, ValueError) as exc:
        raise ConfigError(
            f"hf_model {hf_model!r} is neither a local folder nor in the local Hugging Face cache; fetch it first "
            f"(`hf download {hf_model}`) or give a folder holding config.json and the tokenizer files"
        ) from exc


def load_hf_text_config(hf_model: str) -> Any:
    """The encoder's ``PretrainedConfig``; a composite config (e.g. a full CLIP folder) gives its ``text_config``."""
    from transformers import AutoConfig

    folder = resolve_hf_folder(hf_model)
    try:
        config = AutoConfig.from_pretrained(str(folder))
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"{folder / 'config.json'}: not a Hugging Face model config ({exc})") from exc
    text_config = getattr(config, "text_config", None)
    config = text_config if text_config is not None else config
    if getattr(config, "is_encoder_decoder", False):
        raise ConfigError(f"{folder}: encoder-decoder models ({config.model_type}) are not supported as text towers")
    if config.pad_token_id is None:
        raise ConfigError(f"{folder / 'config.json'}: pad_token_id is not set (the tower masks padding by it)")
    return config


def hf_width(config: Any) -> int:
    width = getattr(config, "hidden_size", None) or getattr(config, "d_model", None)
    if not width:
        raise ConfigError(f"{config.model_type}: the config names no hidden_size")
    return int(width)


def padding_mask(text: torch.Tensor, pad_id: int) -> torch.Tensor:
    """1 for every position up to the last non-padding token of each row, else 0 ([B, L] long).

    A prefix mask rather than ``text != pad_id``: a causal CLIP text model pads with the id of an ordinary
    token, which can also stand inside a text; for other tokenizers the two are the same.
    """
    positions = torch.arange(1, text.shape[1] + 1, device=text.device)  # [L]
    length = ((text != pad_id).long() * positions).amax(dim=1, keepdim=True)  # [B, 1]
    return (positions < length + 1).long()


class HFTextTower(nn.Module):
    """``AutoModel`` (SDPA attention, no pooler) → pooler (cls | mean | eos) → projection to ``embed_dim``.

    State-dict keys ``transformer.*`` and ``proj.*``: under a CLIP's ``text.`` they are open_clip's
    ``HFTextEncoder`` keys, so its checkpoints load without renaming.
    """

    def __init__(self, cfg: HFTextCfg, embed_dim: int, load_weights: bool = False) -> None:
        super().__init__()
        from transformers import AutoModel

        self.cfg = cfg
        config = load_hf_text_config(cfg.hf_model)
        folder = resolve_hf_folder(cfg.hf_model)
        if load_weights and any((folder / name).is_file() for name in HF_WEIGHT_FILES):
            _logger.info("Initialising the text tower from the weights in %s", folder)
            model = AutoModel.from_pretrained(str(folder), config=config, attn_implementation="sdpa")
        else:
            model = AutoModel.from_config(config, attn_implementation="sdpa")
        if getattr(model, "pooler", None) is not None:
            model.pooler = None  # the CLIP pools the hidden states itself
        self.transformer = model
        self.pad_id = int(config.pad_token_id)
        # RoBERTa-style embeddings number positions from padding_idx + 1, so they hold that many fewer tokens.
        offset = getattr(getattr(model, "embeddings", None), "padding_idx", None)
        positions = int(getattr(config, "max_position_embeddings", 0) or 0)
        self.max_tokens = positions - (offset + 1 if isinstance(offset, int) else 0) if positions else None
        width = hf_width(config)
        if cfg.proj == "linear":
            self.proj: nn.Module = nn.Linear(width, embed_dim, bias=False)
        elif cfg.proj == "mlp":
            hidden = (width + embed_dim) // 2
            self.proj = nn.Sequential(
                nn.Linear(width, hidden, bias=False), nn.GELU(), nn.Linear(hidden, embed_dim, bias=False)
            )
        elif width == embed_dim:
            self.proj = nn.Identity()
        else:
            raise ConfigError(f"{cfg.hf_model}: proj 'none' needs hidden size {width} == embed_dim {embed_dim}")

    def forward(self, text: torch.Tensor, trim: bool = True) -> torch.Tensor:  # [B, L] token ids → [B, embed_dim]
        """``trim=False`` keeps every padding column (masked): a traced ONNX graph cannot drop columns."""
        if trim:
            text = trim_padding(text, self.pad_id)
        if self.max_tokens is not None and text.shape[1] > self.max_tokens:
            raise ValueError(
                f"{text.shape[1]} tokens, but the text tower {self.cfg.hf_model} has positions for "
                f"{self.max_tokens}: use --context-length {self.max_tokens} or less"
            )
        mask = padding_mask(text, self.pad_id)
        hidden = self.transformer(input_ids=text, attention_mask=mask).last_hidden_state  # [B, L, H]
        return self.proj(self.pool(hidden, mask))

    def pool(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.cfg.pooler == "cls":
            return hidden[:, 0]
        if self.cfg.pooler == "eos":
            last = mask.sum(dim=1) - 1  # [B]
            return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        weights = mask.unsqueeze(-1).to(hidden.dtype)  # [B, L, 1]
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1)
