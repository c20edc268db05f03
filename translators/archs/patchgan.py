"""PatchGAN discriminator (pix2pix). With ``n_layers=3`` each output logit sees a 70x70 patch.

Input is the conditional pair concatenated on channels: ``(N, in_ch, H, W) -> (N, 1, H', W')`` logits.
"""

from __future__ import annotations

import torch
from torch import nn

from translators.archs.registry import ARCH_REGISTRY
from translators.archs.unet import norm_layer


@ARCH_REGISTRY.register("patchgan")
class PatchGANDiscriminator(nn.Module):
    """Receptive field: 70 px for ``n_layers=3``, 34 for 2, 16 for 1 (see :func:`receptive_field`)."""

    def __init__(self, in_ch: int = 6, base: int = 64, n_layers: int = 3, norm: str = "batch") -> None:
        super().__init__()
        self.n_layers = n_layers

        layers: list[nn.Module] = [nn.Conv2d(in_ch, base, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        ch = base
        for i in range(1, n_layers):
            nxt = base * min(2**i, 8)
            layers += [nn.Conv2d(ch, nxt, 4, stride=2, padding=1), norm_layer(norm, nxt), nn.LeakyReLU(0.2, True)]
            ch = nxt
        nxt = base * min(2**n_layers, 8)
        layers += [nn.Conv2d(ch, nxt, 4, stride=1, padding=1), norm_layer(norm, nxt), nn.LeakyReLU(0.2, True)]
        layers.append(nn.Conv2d(nxt, 1, 4, stride=1, padding=1))
        self.body = nn.Sequential(*layers)

    def receptive_field(self) -> int:
        """Theoretical receptive field side (pixels) of one output logit."""
        rf = 1
        for m in reversed(self.body):
            if isinstance(m, nn.Conv2d):
                rf = (rf - 1) * m.stride[0] + m.kernel_size[0]
        return rf

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)
