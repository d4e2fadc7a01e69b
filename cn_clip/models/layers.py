"""Building blocks shared by the image towers (pre-LN transformer with packed q/k/v, as in OpenAI CLIP)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


class LayerNormFp32(nn.LayerNorm):
    """LayerNorm computed in fp32 and cast back, so mixed-fp16 towers normalise without overflow."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


class QuickGELU(nn.Module):
    """``x * sigmoid(1.702 x)``: the activation the released ViT weights were trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class PackedSelfAttention(nn.Module):
    """Multi-head self-attention whose parameters use ``nn.MultiheadAttention``'s names (``in_proj_*``,
    ``out_proj``), so checkpoints keep the reference layout, computed batch-first with SDPA."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by {heads} heads")
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        self.in_proj_lora: nn.Module | None = None  # low-rank q/k/v update (training/lora.py); no state by default
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, L, D]
        batch, length, width = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # [B, L, 3D]
        if self.in_proj_lora is not None:
            qkv = qkv + self.in_proj_lora(x)
        qkv = qkv.view(batch, length, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # [B, H, L, Dh]
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, width))


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int, act: str = "quick_gelu") -> None:
        super().__init__()
        self.attn = PackedSelfAttention(width, heads)
        self.ln_1 = LayerNormFp32(width)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, width * 4))
        # the module keeps the name "gelu" for either activation (it holds no weights)
        self.mlp.add_module("gelu", QuickGELU() if act == "quick_gelu" else nn.GELU())
        self.mlp.add_module("c_proj", nn.Linear(width * 4, width))
        self.ln_2 = LayerNormFp32(width)
        # Recompute the MLP in backward instead of keeping its 4x-wide hidden activations: set by LoRA when the MLP
        # is frozen, where those activations are most of what a step stores (docs/adaptation.md).
        self.recompute_mlp = False

    def forward(self, x: torch.Tensor, checkpointed: bool = False) -> torch.Tensor:
        """``checkpointed``: the whole block already runs under a checkpoint, so the MLP is not checkpointed again."""
        x = x + self.attn(self.ln_1(x))
        h = self.ln_2(x)
        if self.recompute_mlp and not checkpointed and torch.is_grad_enabled() and h.requires_grad:
            return x + checkpoint(self.mlp, h, use_reentrant=False)
        return x + self.mlp(h)


class Transformer(nn.Module):
    """A stack of pre-LN blocks over batch-first tokens, with optional per-block gradient checkpointing."""

    def __init__(self, width: int, layers: int, heads: int, act: str = "quick_gelu") -> None:
        super().__init__()
        self.width = width
        self.grad_checkpointing = False
        self.resblocks = nn.Sequential(*[ResidualAttentionBlock(width, heads, act) for _ in range(layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, True, use_reentrant=False)
            else:
                x = block(x)
        return x
