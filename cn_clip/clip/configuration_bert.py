"""Reference module path: ``BertConfig`` with the reference's signature, built on ``transformers.BertConfig``.

The reference's first parameter is ``vocab_size_or_config_json_file`` and its positional order ends in
``output_attentions, output_hidden_states, use_flash_attention``; ``transformers.BertConfig`` takes keywords only.
Both spellings map onto the same fields here (docs/compatibility.md#shims).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from transformers import BertConfig as _HFBertConfig

from cn_clip.clip.utils import warn_flash_attention_noop
from cn_clip.errors import ConfigError

__all__ = ["BertConfig"]

# The reference's positional parameters after ``vocab_size_or_config_json_file``, in order.
REFERENCE_POSITIONAL = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "hidden_act",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "max_position_embeddings",
    "type_vocab_size",
    "initializer_range",
    "layer_norm_eps",
    "output_attentions",
    "output_hidden_states",
    "use_flash_attention",
)


def _read_json_config(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path).expanduser()
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"BertConfig: config file {path} does not exist") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"BertConfig: {path} is not a JSON file ({exc})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"BertConfig: {path} holds a JSON {type(values).__name__}, not an object")
    return values


class BertConfig(_HFBertConfig):
    """``BertConfig(21128, 768, 12, …)`` or ``BertConfig(vocab_size_or_config_json_file="bert_config.json")``
    as in the reference, and every ``transformers.BertConfig`` keyword.

    An int is the vocabulary size; a path is a JSON file whose keys become the config (a key also given as a
    keyword is refused rather than overridden). ``use_flash_attention`` is kept as an attribute; ``True`` warns,
    since the text tower always runs PyTorch SDPA attention.
    """

    def __init__(self, vocab_size_or_config_json_file: int | str | os.PathLike | None = None, *args, **kwargs):
        if len(args) > len(REFERENCE_POSITIONAL):
            raise TypeError(f"BertConfig takes at most {len(REFERENCE_POSITIONAL) + 1} positional arguments")
        for name, value in zip(REFERENCE_POSITIONAL, args, strict=False):
            if name in kwargs:
                raise TypeError(f"BertConfig got multiple values for argument {name!r}")
            kwargs[name] = value
        source = vocab_size_or_config_json_file
        if isinstance(source, str | os.PathLike):
            from_file = _read_json_config(source)
            clash = sorted(set(from_file) & set(kwargs))
            if clash:
                raise TypeError(f"BertConfig: {clash} given both in {os.fspath(source)} and as arguments")
            kwargs = {**from_file, **kwargs}
        elif isinstance(source, int) and not isinstance(source, bool):
            if kwargs.get("vocab_size", source) != source:
                raise TypeError(
                    f"BertConfig: vocab_size_or_config_json_file={source} but vocab_size={kwargs['vocab_size']}"
                )
            kwargs["vocab_size"] = source
        elif source is not None:
            raise TypeError(
                f"BertConfig: vocab_size_or_config_json_file must be an int or a JSON path, got {type(source).__name__}"
            )
        use_flash_attention = bool(kwargs.pop("use_flash_attention", False))
        if use_flash_attention:
            warn_flash_attention_noop("BertConfig(use_flash_attention=True)")
        super().__init__(**kwargs)
        self.use_flash_attention = use_flash_attention
