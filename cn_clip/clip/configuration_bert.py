"""Reference module path; the text tower's config is ``transformers.BertConfig``."""

from transformers import BertConfig

__all__ = ["BertConfig"]
