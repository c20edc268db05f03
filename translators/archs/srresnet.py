"""SRResNet (Ledig et al. 2017, "Photo-realistic single image super-resolution using a GAN").

9x9 head conv, ``n_blocks`` residual blocks (conv-BN-PReLU-conv-BN), a global skip, then
log2(scale) pixel-shuffle x2 stages and a 9x9 tail. ``(N, 3, H, W) -> (N, 3, s*H, s*W)``.
The output is the bicubic upsampling of the input plus a learned residual when ``bicubic_skip``
is set (trains much faster on CPU), clamped to ``[0, 1]``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from translators.archs.registry import ARCH_REGISTRY


class _Block(nn.Module):
    def __init__(self, ch: int, batch_norm: bool) -> None:
        super().__init__()
        norm = (lambda: nn.BatchNorm2d(ch)) if batch_norm else nn.Identity
        self.body = nn.Sequential(
            nn.Conv2d(ch, ch, 3, padding=1), norm(), nn.PReLU(ch), nn.Conv2d(ch, ch, 3, padding=1), norm()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


@ARCH_REGISTRY.register("srresnet")
class SRResNet(nn.Module):
    """Super-resolution ResNet with pixel-shuffle upsampling; ``scale`` in {2, 4, 8}.

    Args:
        channels: feature width (paper: 64).
        n_blocks: residual blocks (paper: 16).
        batch_norm: the paper uses BN; EDSR showed dropping it helps, so it is optional.
        bicubic_skip: add a bicubic upsampling of the input to the output.
    """

    def __init__(
        self,
        scale: int = 4,
        in_ch: int = 3,
        out_ch: int = 3,
        channels: int = 64,
        n_blocks: int = 16,
        batch_norm: bool = False,
        bicubic_skip: bool = True,
    ) -> None:
        super().__init__()
        if scale not in (2, 4, 8):
            raise ValueError(f"scale must be 2, 4 or 8, got {scale}")
        if bicubic_skip and in_ch != out_ch:
            raise ValueError("bicubic_skip needs in_ch == out_ch")
        self.scale = scale
        self.size_multiple = 1
        self.bicubic_skip = bicubic_skip
        self.head = nn.Sequential(nn.Conv2d(in_ch, channels, 9, padding=4), nn.PReLU(channels))
        self.blocks = nn.Sequential(*[_Block(channels, batch_norm) for _ in range(n_blocks)])
        self.mid = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels) if batch_norm else nn.Identity()
        )
        ups: list[nn.Module] = []
        for _ in range(int(math.log2(scale))):
            ups += [nn.Conv2d(channels, channels * 4, 3, padding=1), nn.PixelShuffle(2), nn.PReLU(channels)]
        self.up = nn.Sequential(*ups)
        self.tail = nn.Conv2d(channels, out_ch, 9, padding=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.head(x)
        h = h + self.mid(self.blocks(h))
        out = self.tail(self.up(h))
        if self.bicubic_skip:
            out = out + F.interpolate(x, scale_factor=float(self.scale), mode="bicubic", align_corners=False)
            return out.clamp(0.0, 1.0)
        return torch.sigmoid(out)
