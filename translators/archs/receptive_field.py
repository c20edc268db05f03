"""Receptive-field measurements.

The single-example imitation paper (Spingarn-Eliezer & Michaeli) shows that the receptive field of
the imitating model drives how well one example teaches it: every output pixel is a training sample
whose context is one receptive field.
"""

from __future__ import annotations

import torch
from torch import nn


def conv_receptive_field(module: nn.Module) -> int:
    """Theoretical receptive field side (pixels) of a plain feed-forward stack of ``Conv2d`` layers.

    Only valid for sequential stacks without down/up-sampling branches (DnCNN, PatchGAN bodies).
    """
    rf, jump = 1, 1
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            rf += (m.kernel_size[0] - 1) * m.dilation[0] * jump
            jump *= m.stride[0]
    return rf


@torch.no_grad()
def empirical_receptive_field(
    model: nn.Module, size: int = 64, in_ch: int = 3, threshold: float = 1e-6, probes: int = 4, seed: int = 0
) -> int:
    """Side (pixels) of the input region that influences the centre output pixel, measured.

    Back-propagates the centre output pixel to the input and returns the side of the bounding box
    of input pixels whose gradient magnitude exceeds ``threshold``. The input is ``probes`` seeded
    uniform-noise images of shape ``(1, in_ch, size, size)`` in [0, 1] and the gradients are pooled:
    a constant probe is degenerate (every ReLU sees the same pre-activation at every position, so
    a randomly initialised narrow net can switch a whole layer off and the field reads 1).
    Works for any differentiable architecture (U-Nets included). ``size`` must exceed the field.
    """
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    grad = torch.zeros(size, size)
    with torch.enable_grad():
        for _ in range(probes):
            x = torch.rand((1, in_ch, size, size), generator=generator).requires_grad_(True)
            y = model(x)
            cy, cx = y.shape[-2] // 2, y.shape[-1] // 2
            y[0, :, cy, cx].sum().backward()
            grad += x.grad.abs().sum(dim=(0, 1))  # type: ignore[union-attr]
    model.train(was_training)
    rows = torch.nonzero(grad.sum(dim=1) > threshold)
    cols = torch.nonzero(grad.sum(dim=0) > threshold)
    if rows.numel() == 0:
        return 0
    return int(max(rows.max() - rows.min(), cols.max() - cols.min()).item()) + 1
