"""The BERT text tower, built on ``transformers.BertModel`` with SDPA attention and no pooler."""

from __future__ import annotations

import torch
from torch import nn

from cn_clip.models.config import TextCfg

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
