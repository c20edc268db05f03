"""DnCNN denoiser (Zhang et al. 2017, "Beyond a Gaussian denoiser").

``depth`` 3x3 convs (conv-ReLU, (conv-BN-ReLU) x (depth-2), conv) predicting the noise residual;
output = clamp(x - residual, 0, 1). Receptive field is ``2*depth + 1`` pixels a side.
``(N, C, H, W) -> (N, C, H, W)``, any H and W.
"""

from __future__ import annotations

import torch
from torch import nn

from translators.archs.registry import ARCH_REGISTRY


@ARCH_REGISTRY.register("dncnn")
class DnCNN(nn.Module):
    """Residual denoiser; ``depth`` 17 and ``channels`` 64 in the paper."""

    def __init__(self, in_ch: int = 3, channels: int = 64, depth: int = 17, batch_norm: bool = True) -> None:
        super().__init__()
        if depth < 2:
            raise ValueError("depth must be >= 2")
        self.scale = 1
        self.size_multiple = 1
        self.depth = depth
        layers: list[nn.Module] = [nn.Conv2d(in_ch, channels, 3, padding=1), nn.ReLU(True)]
        for _ in range(depth - 2):
            layers.append(nn.Conv2d(channels, channels, 3, padding=1, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm2d(channels))
            layers.append(nn.ReLU(True))
        layers.append(nn.Conv2d(channels, in_ch, 3, padding=1))
        self.body = nn.Sequential(*layers)

    @property
    def receptive_field(self) -> int:
        """Side of the (theoretical) receptive field in pixels: ``2*depth + 1`` (``depth`` 3x3 convs).

        Plain integer arithmetic so that ``torch.jit.script`` can compile the property.
        """
        return 2 * self.depth + 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.body(x)).clamp(0.0, 1.0)
