"""The ViT image tower (OpenAI-CLIP layout) with FLIP random patch masking."""

from __future__ import annotations

import torch
from torch import nn

from cn_clip.models.config import VisionCfg
from cn_clip.models.layers import LayerNormFp32, Transformer


def flip_keep_count(num_tokens: int, mask_ratio: float) -> int:
    """Patches kept by FLIP out of ``num_tokens`` (class token included): ``floor((L-1)(1-r))``."""
    return int((num_tokens - 1) * (1 - mask_ratio))


def random_patch_masking(
    tokens: torch.Tensor, mask_ratio: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Keep the class token plus a uniformly random subset of patches, in random order (FLIP).

    Order does not matter downstream: attention is unmasked and positions are already added.
    """
    batch, length, width = tokens.shape  # [B, L, D]
    keep = flip_keep_count(length, mask_ratio)
    if not 0 < keep <= length - 1:
        raise ValueError(f"mask_ratio {mask_ratio} keeps {keep} of {length - 1} patches; use 0 <= mask_ratio < 1")
    noise = torch.rand(batch, length - 1, device=tokens.device, generator=generator)
    keep_idx = noise.argsort(dim=1)[:, :keep] + 1  # [B, keep], patch positions (class token is 0)
    patches = tokens.gather(1, keep_idx.unsqueeze(-1).expand(-1, -1, width))
    return torch.cat([tokens[:, :1], patches], dim=1)


class VisionTransformer(nn.Module):
    def __init__(self, cfg: VisionCfg) -> None:
        super().__init__()
        width, patch = cfg.vision_width, cfg.vision_patch_size
        assert patch is not None and isinstance(cfg.vision_layers, int)
        self.input_resolution = cfg.image_resolution
        self.grid_size = (cfg.grid_size, cfg.grid_size)
        self.output_dim = cfg.embed_dim
        scale = width**-0.5
        # Parameters first, then modules: this is the reference's state-dict order.
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(cfg.grid_size**2 + 1, width))
        self.proj = nn.Parameter(scale * torch.randn(width, cfg.embed_dim))
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch, stride=patch, bias=False)
        self.ln_pre = LayerNormFp32(width)
        self.transformer = Transformer(width, cfg.vision_layers, cfg.heads, cfg.vision_act)
        self.ln_post = LayerNormFp32(width)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.transformer.grad_checkpointing = enable

    def embed(self, image: torch.Tensor) -> torch.Tensor:
        """Patchify and add class token and positions: [B, 3, R, R] → [B, grid²+1, D]."""
        x = self.conv1(image).flatten(2).transpose(1, 2)  # [B, grid², D]
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        return torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)

    def forward(
        self, image: torch.Tensor, mask_ratio: float = 0.0, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        x = self.embed(image)
        if mask_ratio:
            x = random_patch_masking(x, mask_ratio, generator)
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x[:, 0]) @ self.proj  # [B, embed_dim]
