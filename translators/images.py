"""Tensor <-> array conversions and small image helpers.

Convention: float tensors ``(N, 3, H, W)`` in ``[0, 1]``; numpy uint8 arrays ``(H, W, 3)``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def from_uint8(arr: np.ndarray) -> torch.Tensor:
    """``(H, W, 3)`` uint8 -> ``(1, 3, H, W)`` float32 in [0, 1]."""
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"expected (H, W, 3) uint8, got {arr.shape} {arr.dtype}")
    return torch.from_numpy(np.array(arr, copy=True)).permute(2, 0, 1).unsqueeze(0).float().div_(255.0)


def to_uint8(t: torch.Tensor) -> np.ndarray:
    """``(1, 3, H, W)`` or ``(3, H, W)`` float in [0, 1] -> ``(H, W, 3)`` uint8 (rounded, clamped)."""
    if t.ndim == 4:
        if t.shape[0] != 1:
            raise ValueError(f"to_uint8 takes one image, got a batch of {t.shape[0]}")
        t = t[0]
    if t.ndim != 3 or t.shape[0] != 3:
        raise ValueError(f"expected (3, H, W), got {tuple(t.shape)}")
    return to_uint8_tensor(t.detach().float()).permute(1, 2, 0).cpu().numpy()


def to_uint8_tensor(x: torch.Tensor) -> torch.Tensor:
    """Float tensor of any shape (e.g. ``(N, 3, H, W)`` or ``(3, H, W)``) in [0, 1] -> uint8 tensor of the
    same shape and device holding ``round(clamp(x, 0, 1) * 255)`` (ties to even, as ``torch.round``).

    The layout stays as is (no permute, no copy to the CPU); :func:`to_uint8` is the numpy ``(H, W, 3)`` form.
    The arithmetic runs in ``x``'s dtype.
    """
    return x.clamp(0, 1).mul(255.0).round().to(torch.uint8)


def quantize_8bit(x: torch.Tensor) -> torch.Tensor:
    """Round to the 8-bit grid, as a PNG or an API answer would: ``round(clamp(x, 0, 1) * 255) / 255``.

    ``x``: float tensor of any shape (e.g. ``(N, 3, H, W)``) with values in [0, 1] (others are clamped).
    Returns a tensor of the same shape, dtype and device with values in ``{0, 1/255, ..., 1}``.
    """
    return x.clamp(0, 1).mul(255).round().div(255)


def bicubic_resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bicubic resize with antialiasing (as in MATLAB ``imresize`` used by SR papers), clamped."""
    return F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)


def downscale(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Bicubic downscale by an integer ``factor``; H and W must be multiples of it."""
    h, w = x.shape[-2:]
    if h % factor or w % factor:
        raise ValueError(f"size {h}x{w} is not a multiple of {factor}")
    return bicubic_resize(x, (h // factor, w // factor))


def upscale(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Plain bicubic upscaling, the trivial super-resolution baseline."""
    h, w = x.shape[-2:]
    return F.interpolate(x, size=(h * factor, w * factor), mode="bicubic", align_corners=False).clamp(0, 1)


def center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    if h < size or w < size:
        raise ValueError(f"cannot crop {size}x{size} from {h}x{w}")
    top, left = (h - size) // 2, (w - size) // 2
    return x[..., top : top + size, left : left + size]


def crop_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Crop the bottom/right so H and W are multiples of ``multiple``."""
    h, w = x.shape[-2:]
    return x[..., : h - h % multiple, : w - w % multiple]
