"""Residual U-Net: a full-resolution path and a global residual, for identity-like mappings.

The attacker's default surrogate (``resunet`` kind in :mod:`attacker.surrogates`). Output is
``base(x) + f(x)`` where ``base`` is the input itself (same-size tasks) or its bicubic upscale
(super-resolution, ``scale > 1``) and ``f`` a small U-Net whose last conv starts at zero, so the
untrained network *is* the trivial baseline (identity / bicubic) and training only has to learn the
difference. Unlike :class:`translators.archs.unet.UNetGenerator` (first layer a stride-2 conv, sigmoid
output) the first two convs run at full resolution, so pixel-exact detail survives.

Why: issue 14 measured a naive 3-level net of this shape at 30.6 dB (surrogate vs victim, unseen photos)
from 16 harvested 64x64 pairs of a same-size stylisation after 400 Adam steps, where the sigmoid U-Net
reached 23.5 dB (identity 23.8 dB). Registered here (not in :mod:`attacker`) so a stolen model's
checkpoint loads in any process.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from translators.archs.registry import ARCH_REGISTRY


def _block(cin: int, cout: int, convs: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(convs):
        layers += [nn.Conv2d(cin if i == 0 else cout, cout, 3, padding=1), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


@ARCH_REGISTRY.register("resunet")
class ResUNet(nn.Module):
    """``(N, in_ch, H, W) -> (N, out_ch, s*H, s*W)`` in [0, 1]; any ``H, W`` (reflect-padded inside).

    Args:
        in_ch, out_ch: channel counts (equal: the residual adds the input).
        scale: 1 for same-size tasks; 2, 3, 4, 8 upsample bicubically first (SR) and the U-Net runs
            at the output resolution.
        base: channels of the full-resolution path; level ``i`` has ``min(base * 2**i, max_channels)``.
        levels: number of stride-2 down-samplings (3 in the issue's measurement).
        convs: 3x3 convs per level (each followed by ReLU).
        max_channels: channel cap.
        pointwise: 1x1 conv + ReLU layers of ``2 * base`` channels before the tail (per-pixel nonlinear
            capacity at full resolution: tone curves, posterisation, thresholds; 0 = none).
    """

    def __init__(self, in_ch: int = 3, out_ch: int = 3, scale: int = 1, base: int = 32, levels: int = 3,
                 convs: int = 2, max_channels: int = 128, pointwise: int = 0) -> None:
        super().__init__()
        if in_ch != out_ch:
            raise ValueError("the global residual needs in_ch == out_ch")
        if scale < 1 or levels < 0 or convs < 1 or base < 1 or pointwise < 0:
            raise ValueError("scale >= 1, levels >= 0, convs >= 1, base >= 1 and pointwise >= 0 are required")
        self.scale = scale
        self.size_multiple = 1
        self._m = 2**levels
        chans = [min(base * 2**i, max_channels) for i in range(levels + 1)]
        self.head = _block(in_ch, chans[0], convs)
        self.downs = nn.ModuleList(
            nn.Sequential(nn.Conv2d(chans[i], chans[i + 1], 3, stride=2, padding=1), nn.ReLU(inplace=True),
                          _block(chans[i + 1], chans[i + 1], max(1, convs - 1)))
            for i in range(levels))
        self.ups = nn.ModuleList(_block(chans[i + 1] + chans[i], chans[i], convs) for i in reversed(range(levels)))
        pw: list[nn.Module] = []
        for i in range(pointwise):
            pw += [nn.Conv2d(chans[0] if i == 0 else 2 * base, 2 * base, 1), nn.ReLU(inplace=True)]
        self.pointwise = nn.Sequential(*pw)
        self.tail = nn.Conv2d(2 * base if pointwise else chans[0], out_ch, 3, padding=1)
        nn.init.zeros_(self.tail.weight)
        nn.init.zeros_(self.tail.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale > 1:
            x = F.interpolate(x, scale_factor=float(self.scale), mode="bicubic", align_corners=False).clamp(0, 1)
        h, w = x.shape[-2], x.shape[-1]
        ph, pw = (-h) % self._m, (-w) % self._m
        xp = x
        if ph > 0 or pw > 0:
            xp = F.pad(x, [0, pw, 0, ph], mode="reflect" if ph < h and pw < w else "replicate")
        feats = [self.head(xp)]
        for down in self.downs:
            feats.append(down(feats[-1]))
        y = feats.pop()
        for up in self.ups:
            skip = feats.pop()
            y = F.interpolate(y, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            y = up(torch.cat([y, skip], dim=1))
        out = x + self.tail(self.pointwise(y))[..., :h, :w]
        if self.training:
            return out
        return out.clamp(0.0, 1.0)
