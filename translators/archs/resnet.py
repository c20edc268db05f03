"""ResNet generator (CycleGAN, Zhu et al. 2017; after Johnson et al. 2016).

c7s1-base, two stride-2 downsamplings, ``n_blocks`` residual blocks, two upsamplings, c7s1-out.
Input sides must be multiples of 4. Output in ``[0, 1]`` via sigmoid.
"""

from __future__ import annotations

import torch
from torch import nn

from translators.archs.registry import ARCH_REGISTRY


class _ResBlock(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.ReflectionPad2d(1),
            nn.Conv2d(ch, ch, 3),
            nn.InstanceNorm2d(ch, affine=True),
            nn.ReLU(True),
            nn.ReflectionPad2d(1),
            nn.Conv2d(ch, ch, 3),
            nn.InstanceNorm2d(ch, affine=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


@ARCH_REGISTRY.register("resnet")
class ResnetGenerator(nn.Module):
    """``(N, in_ch, H, W) -> (N, out_ch, H, W)``, H and W multiples of 4.

    Args:
        base: width of the first conv (CycleGAN uses 64).
        n_blocks: residual blocks at 1/4 resolution (CycleGAN uses 9 at 256 px, 6 at 128 px).
    """

    def __init__(self, in_ch: int = 3, out_ch: int = 3, base: int = 64, n_blocks: int = 9) -> None:
        super().__init__()
        self.scale = 1
        self.size_multiple = 4
        layers: list[nn.Module] = [
            nn.ReflectionPad2d(3),
            nn.Conv2d(in_ch, base, 7),
            nn.InstanceNorm2d(base, affine=True),
            nn.ReLU(True),
        ]
        ch = base
        for _ in range(2):
            layers += [nn.Conv2d(ch, ch * 2, 3, stride=2, padding=1), nn.InstanceNorm2d(ch * 2, affine=True),
                       nn.ReLU(True)]
            ch *= 2
        layers += [_ResBlock(ch) for _ in range(n_blocks)]
        for _ in range(2):
            layers += [nn.ConvTranspose2d(ch, ch // 2, 3, stride=2, padding=1, output_padding=1),
                       nn.InstanceNorm2d(ch // 2, affine=True), nn.ReLU(True)]
            ch //= 2
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(ch, out_ch, 7)]
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.body(x))
