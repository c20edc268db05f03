"""A U-Net that first upsamples its input: the attacker's pix2pix / L2 U-Net surrogate for SR.

Registered as ``bicubic_unet`` so :func:`translators.checkpoint.load_model` rebuilds an SR surrogate
from its card in any process (the evaluator, the victim service serving a stolen model) without
importing :mod:`attacker`. Same-size surrogates use the plain ``unet`` architecture instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from translators.archs.registry import ARCH_REGISTRY
from translators.archs.unet import UNetGenerator


@ARCH_REGISTRY.register("bicubic_unet")
class BicubicUNet(nn.Module):
    """``(N, 3, H, W) -> (N, 3, s*H, s*W)``: bicubic x``scale``, reflect-pad to ``2**depth``, U-Net, crop.

    Any input size is accepted (``size_multiple`` 1). Remaining kwargs go to
    :class:`translators.archs.unet.UNetGenerator`.
    """

    def __init__(self, scale: int = 4, **unet_kwargs: object) -> None:
        super().__init__()
        if scale < 1:
            raise ValueError("scale must be >= 1")
        self.scale = scale
        self.size_multiple = 1
        self.unet = UNetGenerator(**unet_kwargs)  # type: ignore[arg-type]
        self._m = self.unet.size_multiple

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale > 1:
            x = F.interpolate(x, scale_factor=float(self.scale), mode="bicubic", align_corners=False).clamp(0, 1)
        h, w = x.shape[-2], x.shape[-1]
        ph, pw = (-h) % self._m, (-w) % self._m
        if ph > 0 or pw > 0:
            x = F.pad(x, [0, pw, 0, ph], mode="reflect" if ph < h and pw < w else "replicate")
        return self.unet(x)[..., :h, :w]
