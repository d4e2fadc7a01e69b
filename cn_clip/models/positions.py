"""How long a caption the text tower reads: its position limit, the check of ``--context-length`` against it, and
stretching the position table beyond it (``--interpolate-positions``).

The limit is the number of learned positions: 512 for every released RoBERTa-wwm tower and for BERT-Tiny-chinese
(``text_max_position_embeddings``). A tower whose position table reserves rows below the padding id (RoBERTa/XLM-R
style, ``padding_idx`` set) loses those rows from the limit.

Interpolation resamples the learned table linearly to the new length (first and last positions kept), the usual
way to extend absolute position embeddings; fine-tune afterwards for best results. A checkpoint saved after
interpolation carries the longer table, and loading it grows the model's table to match
(:func:`fit_checkpoint_positions`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from cn_clip.errors import ConfigError

_logger = logging.getLogger(__name__)
POSITION_KEY = "bert.embeddings.position_embeddings.weight"


def _embeddings(model: nn.Module) -> nn.Module:
    return model.bert.embeddings


def _offset(table: nn.Embedding) -> int:
    """Rows before position 0 (RoBERTa-style tables start counting after the padding id)."""
    return 0 if table.padding_idx is None else table.padding_idx + 1


def position_limit(model: nn.Module) -> int:
    """The longest token sequence (incl. [CLS]/[SEP]) the text tower has positions for."""
    table = _embeddings(model).position_embeddings
    return table.num_embeddings - _offset(table)


def check_text_length(model: nn.Module, length: int) -> None:
    """A batch whose texts (padding trimmed) are longer than the tower's positions: a ValueError saying so, instead
    of an index error deep inside the embedding lookup."""
    limit = position_limit(model)
    if length > limit:
        raise ValueError(
            f"token sequences of length {length} exceed the text tower's position limit {limit}; tokenize with "
            f"context_length <= {limit} or stretch the positions (--interpolate-positions)"
        )


def check_context_length(model: nn.Module, context_length: int, interpolate: bool = False) -> int:
    """``context_length`` if the tower has positions for it; beyond the limit, a ConfigError naming it or, with
    ``interpolate``, the table stretched to ``context_length`` (the model is changed in place)."""
    if isinstance(context_length, bool) or not isinstance(context_length, int) or context_length < 2:
        raise ConfigError(f"--context-length must be an integer ≥ 2 ([CLS] + [SEP]), got {context_length!r}")
    if model.cfg.text.kind != "bert":  # a Hugging Face tower checks its own limit when it encodes
        if interpolate:
            raise ConfigError("--interpolate-positions supports the BERT text towers only")
        return context_length
    limit = position_limit(model)
    if context_length <= limit:
        return context_length
    if not interpolate:
        raise ConfigError(
            f"--context-length {context_length} exceeds the text tower's position limit {limit}; use at most {limit}, "
            "or pass --interpolate-positions to stretch its position embeddings"
        )
    interpolate_positions(model, context_length)
    _logger.warning(
        "position embeddings interpolated from %d to %d positions (fine-tune before relying on the new ones)",
        limit,
        context_length,
    )
    return context_length


def interpolate_positions(model: nn.Module, length: int) -> None:
    """Resample the position table to ``length`` positions (linear, ends aligned); reserved rows are kept."""
    embeddings = _embeddings(model)
    table = embeddings.position_embeddings
    offset = _offset(table)
    with torch.no_grad():
        old = table.weight[offset:].float()  # [L_old, H]
        new = nn.functional.interpolate(old.t()[None], size=length, mode="linear", align_corners=True)[0].t()
        weight = torch.cat([table.weight[:offset].float(), new]).to(table.weight.dtype)
    resized = nn.Embedding(length + offset, table.embedding_dim, padding_idx=table.padding_idx)
    resized.to(device=table.weight.device, dtype=table.weight.dtype)
    with torch.no_grad():
        resized.weight.copy_(weight)
    resized.weight.requires_grad_(table.weight.requires_grad)
    embeddings.position_embeddings = resized
    _resize_buffers(embeddings, length + offset)
    model.bert.config.max_position_embeddings = length + offset


def _resize_buffers(embeddings: nn.Module, rows: int) -> None:
    """transformers' non-persistent ``position_ids`` / ``token_type_ids`` buffers span the table."""
    if hasattr(embeddings, "position_ids"):
        device = embeddings.position_ids.device
        start = int(embeddings.position_ids[0, 0])
        embeddings.position_ids = torch.arange(start, start + rows, device=device).expand((1, -1))
    if hasattr(embeddings, "token_type_ids"):
        embeddings.token_type_ids = torch.zeros((1, rows), dtype=torch.long, device=embeddings.token_type_ids.device)


def fit_checkpoint_positions(model: nn.Module, state_dict: Mapping[str, Any]) -> None:
    """Before a strict load: a checkpoint trained with interpolated (more) positions grows the model's table to its
    row count; its weights then replace the resampled ones. Fewer rows are left to the strict key check."""
    rows = next((v.shape[0] for k, v in state_dict.items() if k.endswith(POSITION_KEY) and hasattr(v, "shape")), None)
    table = _embeddings(model).position_embeddings
    if rows is not None and rows > table.num_embeddings:
        interpolate_positions(model, rows - _offset(table))
