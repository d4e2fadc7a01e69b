"""Reference module path; the text tower is ``transformers.BertModel`` (SDPA attention, no pooler)."""

from transformers import BertModel

__all__ = ["BertModel"]
