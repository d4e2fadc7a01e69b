"""Matryoshka embeddings: the first ``k`` coordinates of a feature, re-normalised, are a usable ``k``-d embedding.

Training with ``--matryoshka-dims 512,256,128,64`` (``training/loss.MatryoshkaLoss``) makes the leading coordinates
carry the most information; ``encode_image/encode_text(..., dim=k)``, ``extract_features --dim k`` and
``search index --dim k`` then read them. Without that training, truncation still runs but loses more recall.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from cn_clip.errors import ConfigError

if TYPE_CHECKING:
    import torch


def truncate(features: torch.Tensor, dim: int) -> torch.Tensor:
    """``features[..., :dim]`` divided by its L2 norm: [B, D] → [B, dim]. Scaling a row does not change its
    direction, so truncating unnormalised or normalised features gives the same result."""
    head = features[..., :dim]
    return head / head.norm(dim=-1, keepdim=True)


def check_dim(dim: int, embed_dim: int, what: str = "--dim") -> int:
    """``dim`` if it is a usable prefix length of an ``embed_dim``-d feature, else a ConfigError naming it."""
    if isinstance(dim, bool) or not isinstance(dim, int) or not 1 <= dim <= embed_dim:
        raise ConfigError(f"{what} {dim!r}: must be an integer between 1 and the model's embed_dim {embed_dim}")
    return dim


def parse_dims(text: str) -> tuple[int, ...]:
    """``"512,256,128,64"`` → ``(512, 256, 128, 64)``: positive, distinct, sorted from largest."""
    problem = f"--matryoshka-dims {text!r}: expected distinct positive integers, e.g. 512,256,128,64"
    try:
        dims = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ConfigError(problem) from None
    if not dims or min(dims) < 1 or len(set(dims)) != len(dims):
        raise ConfigError(problem)
    return tuple(sorted(dims, reverse=True))


def check_dims(dims: Sequence[int], embed_dim: int) -> tuple[int, ...]:
    for dim in dims:
        check_dim(dim, embed_dim, "--matryoshka-dims entry")
    return tuple(dims)
