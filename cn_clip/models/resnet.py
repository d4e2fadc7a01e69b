"""The ModifiedResNet image tower (RN50): 3-conv stem, anti-aliased strides, attention pooling."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from cn_clip.models.config import VisionCfg


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        outplanes = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        # Strided convs are replaced by an average pool before the last 1x1 conv (anti-aliasing).
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, outplanes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(outplanes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Sequential | None = None
        if stride > 1 or inplanes != outplanes:
            # Names "-1", "0", "1" are the reference's state-dict keys (downsample.0 = conv, .1 = BN).
            self.downsample = nn.Sequential()
            self.downsample.add_module("-1", nn.AvgPool2d(stride))
            self.downsample.add_module("0", nn.Conv2d(inplanes, outplanes, 1, bias=False))
            self.downsample.add_module("1", nn.BatchNorm2d(outplanes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(self.avgpool(out)))
        identity = self.downsample(x) if self.downsample is not None else x
        return self.relu(out + identity)


class AttentionPool2d(nn.Module):
    """Attention pooling: the mean token (plus positions) attends over all spatial tokens; only it is returned."""

    def __init__(self, spatial_dim: int, embed_dim: int, heads: int, output_dim: int) -> None:
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(spatial_dim**2 + 1, embed_dim) / embed_dim**0.5)
        # Registration order k, q, v, c is the reference's state-dict order.
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.c_proj = nn.Linear(embed_dim, output_dim)
        self.num_heads = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, C, H, W]
        x = x.flatten(2).transpose(1, 2)  # [B, HW, C]
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1) + self.positional_embedding.to(x.dtype)
        batch, length, width = x.shape
        head_dim = width // self.num_heads

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, -1, self.num_heads, head_dim).transpose(1, 2)

        # Only the pooled (first) token's output is used, so only its query is computed.
        query = heads(self.q_proj(x[:, :1]))
        out = F.scaled_dot_product_attention(query, heads(self.k_proj(x)), heads(self.v_proj(x)))  # [B, H, 1, Dh]
        return self.c_proj(out.transpose(1, 2).reshape(batch, width))


class ModifiedResNet(nn.Module):
    def __init__(self, cfg: VisionCfg) -> None:
        super().__init__()
        assert isinstance(cfg.vision_layers, tuple) and len(cfg.vision_layers) == 4
        width = cfg.vision_width
        self.input_resolution = cfg.image_resolution
        self.output_dim = cfg.embed_dim
        self.grad_checkpointing = False
        self.conv1 = nn.Conv2d(3, width // 2, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width // 2)
        self.conv2 = nn.Conv2d(width // 2, width // 2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.conv3 = nn.Conv2d(width // 2, width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.avgpool = nn.AvgPool2d(2)
        self.relu = nn.ReLU(inplace=True)
        inplanes = width
        for index, (blocks, stride) in enumerate(zip(cfg.vision_layers, (1, 2, 2, 2), strict=True)):
            planes = width * 2**index
            layer = [Bottleneck(inplanes, planes, stride)]
            inplanes = planes * Bottleneck.expansion
            layer += [Bottleneck(inplanes, planes) for _ in range(1, blocks)]
            self.add_module(f"layer{index + 1}", nn.Sequential(*layer))
        self.attnpool = AttentionPool2d(cfg.grid_size, width * 32, cfg.heads, cfg.embed_dim)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Checkpoint each bottleneck block (the reference's switch is a no-op for ResNets)."""
        self.grad_checkpointing = enable

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        for conv, bn in ((self.conv1, self.bn1), (self.conv2, self.bn2), (self.conv3, self.bn3)):
            x = self.relu(bn(conv(x)))
        return self.avgpool(x)

    def forward(self, image: torch.Tensor, mask_ratio: float = 0.0, generator: torch.Generator | None = None):
        if mask_ratio:
            raise ValueError("FLIP masking (mask_ratio > 0) is only defined for ViT towers, not ModifiedResNet")
        x = self._stem(image.to(self.conv1.weight.dtype))
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in layer:
                use_ckpt = self.grad_checkpointing and torch.is_grad_enabled()
                x = checkpoint(block, x, use_reentrant=False) if use_ckpt else block(x)
        return self.attnpool(x)
