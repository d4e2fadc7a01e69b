"""Error types raised for user-facing problems.

Every message names the file, line or key at fault so that a user can fix the input without reading code.
Entry points turn a :class:`CnClipError` into one line on stderr and exit code 2.
"""

from __future__ import annotations


class CnClipError(Exception):
    """Base class of all errors caused by user input (paths, data, checkpoints, flags)."""


class ConfigError(CnClipError):
    """A model config is missing, unknown or malformed."""


class CheckpointError(CnClipError):
    """A checkpoint cannot be read or does not fit the model."""


class DataError(CnClipError):
    """A dataset file (TSV, JSONL, LMDB) is malformed or inconsistent."""


class DownloadError(CnClipError):
    """Released weights could not be fetched or failed verification."""
