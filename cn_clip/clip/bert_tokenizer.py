"""Compatibility module for ``from cn_clip.clip.bert_tokenizer import FullTokenizer`` (the reference's import path).

The implementation lives in :mod:`cn_clip.tokenizer`; nothing is built at import time.
"""

from __future__ import annotations

from cn_clip.tokenizer import (
    VOCAB_PATH,
    BasicTokenizer,
    FullTokenizer,
    WordpieceTokenizer,
    load_vocab,
    to_unicode,
)

__all__ = ["BasicTokenizer", "FullTokenizer", "WordpieceTokenizer", "convert_to_unicode", "default_vocab", "load_vocab"]

convert_to_unicode = to_unicode


def default_vocab() -> str:
    """Path of the shipped ``vocab.txt`` (as a string, like the reference)."""
    return str(VOCAB_PATH)
