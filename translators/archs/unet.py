"""U-Net generator (pix2pix, Isola et al. 2017), with configurable depth and width.

Each level halves the resolution with a stride-2 4x4 conv and doubles the channels (capped at
``max_channels``); the decoder mirrors it with transposed convs and skip connections. Input sides
must be multiples of ``2**depth``. Output goes through a sigmoid so it lies in ``[0, 1]``.
"""

from __future__ import annotations

import torch
from torch import nn

from translators.archs.registry import ARCH_REGISTRY


def norm_layer(kind: str, ch: int) -> nn.Module:
    """The normalisation layer ``kind`` (``batch``, ``instance`` with affine, ``none``) for ``ch`` channels
    (U-Net and PatchGAN, as in pix2pix)."""
    if kind == "batch":
        return nn.BatchNorm2d(ch)
    if kind == "instance":
        return nn.InstanceNorm2d(ch, affine=True)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {kind!r}; use batch, instance or none")


class _Down(nn.Module):
    def __init__(self, cin: int, cout: int, norm: str, first: bool) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        if not first:
            layers.append(nn.LeakyReLU(0.2))
        layers.append(nn.Conv2d(cin, cout, 4, stride=2, padding=1, bias=norm != "batch"))
        if not first:
            layers.append(norm_layer(norm, cout))
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class _Up(nn.Module):
    def __init__(self, cin: int, cout: int, norm: str, dropout: float) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            nn.ReLU(),
            nn.ConvTranspose2d(cin, cout, 4, stride=2, padding=1, bias=norm != "batch"),
            norm_layer(norm, cout),
        ]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


@ARCH_REGISTRY.register("unet")
class UNetGenerator(nn.Module):
    """pix2pix U-Net: ``(N, in_ch, H, W) -> (N, out_ch, H, W)``, H and W multiples of ``2**depth``.

    Args:
        in_ch, out_ch: channel counts.
        base: channels after the first conv (pix2pix uses 64).
        depth: number of down-sampling levels (pix2pix ``unet_256`` uses 8).
        max_channels: channel cap (pix2pix uses 512).
        norm: ``batch`` (pix2pix), ``instance`` or ``none``.
        dropout: dropout in the innermost three decoder blocks (pix2pix uses 0.5 as its noise source).
        residual: if true, predict ``sigmoid(logit(x) + delta)``-style residual: output = clamp(x + tanh(.))
            which trains faster for restoration tasks where output is close to input.
    """

    def __init__(
        self,
        in_ch: int = 3,
        out_ch: int = 3,
        base: int = 64,
        depth: int = 8,
        max_channels: int = 512,
        norm: str = "batch",
        dropout: float = 0.0,
        residual: bool = False,
    ) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError("depth must be >= 1")
        if residual and in_ch != out_ch:
            raise ValueError("residual U-Net needs in_ch == out_ch")
        self.scale = 1
        self.size_multiple = 2**depth
        self.residual = residual
        chans = [min(base * 2**i, max_channels) for i in range(depth)]
        self.downs = nn.ModuleList()
        prev = in_ch
        for i, ch in enumerate(chans):
            self.downs.append(_Down(prev, ch, norm if i < depth - 1 else "none", first=i == 0))
            prev = ch
        self.ups = nn.ModuleList()
        for i in reversed(range(depth)):
            cin = chans[i] if i == depth - 1 else chans[i] * 2
            cout = chans[i - 1] if i > 0 else base
            drop = dropout if (depth - 1 - i) < 3 and i > 0 else 0.0
            self.ups.append(_Up(cin, cout, norm, drop))
        self.head = nn.Sequential(nn.ReLU(), nn.Conv2d(base, out_ch, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips: list[torch.Tensor] = []
        h = x
        for down in self.downs:
            h = down(h)
            skips.append(h)
        skips.pop()  # innermost output feeds the first up block directly
        for up in self.ups:
            h = up(h)
            if skips:
                h = torch.cat([h, skips.pop()], dim=1)
        out = self.head(h)
        if self.residual:
            return (x + torch.tanh(out)).clamp(0.0, 1.0)
        return torch.sigmoid(out)
