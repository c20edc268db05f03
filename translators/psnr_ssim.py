"""PSNR, SSIM and MS-SSIM through ``piq``: the one implementation every layer scores images with.

:mod:`evaluation.metrics` wraps these functions with input validation and one-line user errors (and
re-exports :class:`MetricSettings`); the attacker (:mod:`attacker.fidelity`) and the zoo builder
(:mod:`translators.zoo.build`) call them directly, which is why they live in ``translators/``, the lowest
layer.

Pipeline: :func:`crop_and_convert` applies ``settings.crop_border`` and ``settings.color_space`` to a pair
of ``(N, C, H, W)`` float batches whose values already lie in ``[0, settings.data_range]`` (nothing is
validated or clamped here); :func:`psnr_scores`, :func:`ssim_scores` and :func:`ms_ssim_scores` then
return per-image scores ``(N,)`` in the inputs' dtype and device.

Formulas (piq): PSNR ``= -10 log10(MSE / data_range^2 + 1e-8)`` over all pixels and channels of one image,
so identical images score 80 dB. SSIM: Wang et al. 2004, Gaussian window ``ssim_kernel_size`` (11) with
sigma ``ssim_kernel_sigma`` (1.5), K1 0.01, K2 0.03, valid-region average, channels averaged; the average
pooling by ``round(min(H, W) / 256)`` of the MATLAB reference only with ``ssim_downsample=True`` (off by
default, as in scikit-image and BasicSR). MS-SSIM: five scales with weights :data:`MS_SSIM_WEIGHTS`.

``piq`` is imported on first use: it imports torchvision and torch._dynamo (about 1 s), which commands
that never score an image should not pay at start-up.
"""

from __future__ import annotations

from types import ModuleType
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

ColorSpace = Literal["rgb", "y"]
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)

__all__ = [
    "MS_SSIM_WEIGHTS",
    "ColorSpace",
    "MetricSettings",
    "crop_and_convert",
    "ms_ssim_min_side",
    "ms_ssim_scores",
    "psnr_scores",
    "rgb_to_y",
    "ssim_scores",
]


class MetricSettings(BaseModel):
    """How images are scored; stored next to every score in ``results.json``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    data_range: float = Field(1.0, gt=0, description="maximum pixel value; inputs lie in [0, data_range]")
    crop_border: int = Field(0, ge=0, description="pixels cropped from every side before scoring")
    color_space: ColorSpace = Field("rgb", description="rgb: all channels; y: ITU-R BT.601 luma (SR papers)")
    ssim_kernel_size: int = Field(11, ge=3, description="Gaussian window side for SSIM and MS-SSIM (odd)")
    ssim_kernel_sigma: float = Field(1.5, gt=0)
    ssim_downsample: bool = Field(False, description="piq/MATLAB average pooling before SSIM")

    @field_validator("ssim_kernel_size")
    @classmethod
    def _odd(cls, v: int) -> int:
        if v % 2 == 0:
            raise ValueError("must be odd")
        return v

    def describe(self) -> str:
        """One line for reports: ``data range 1.0, border crop 4 px, Y (BT.601) channel``."""
        space = "Y (BT.601 luma)" if self.color_space == "y" else "RGB"
        return f"data range {self.data_range:g}, border crop {self.crop_border} px, {space}"


def ms_ssim_min_side(settings: MetricSettings) -> int:
    """Smallest image side (after the border crop) MS-SSIM accepts: ``(k - 1) * 2**4 + 1``."""
    return (settings.ssim_kernel_size - 1) * 2 ** (len(MS_SSIM_WEIGHTS) - 1) + 1


def rgb_to_y(x: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """ITU-R BT.601 luma of ``(N, 3, H, W)`` RGB in ``[0, data_range]`` -> ``(N, 1, H, W)``.

    ``Y = (16 * data_range + 65.481 R + 128.553 G + 24.966 B) / 255`` (MATLAB ``rgb2ycbcr``, as in
    SR papers; equals ``skimage.color.rgb2ycbcr(...)[..., 0] / 255`` for ``data_range=1``).
    Raises ``ValueError`` for anything but ``(N, 3, H, W)``.
    """
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"the Y colour space needs RGB images (N, 3, H, W), got {tuple(x.shape)}")
    w = torch.tensor([65.481, 128.553, 24.966], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return ((x * w).sum(dim=1, keepdim=True) + 16.0 * data_range) / 255.0


def crop_and_convert(
    x: torch.Tensor, y: torch.Tensor, settings: MetricSettings
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply ``settings.crop_border`` and ``settings.color_space`` to a pair of ``(N, C, H, W)`` batches.

    Returns ``(N, C', H - 2c, W - 2c)`` views or tensors (``C' = 1`` for the Y colour space). Raises
    ``ValueError`` when the crop leaves nothing or the Y colour space gets non-RGB images.
    """
    c = settings.crop_border
    if c:
        h, w = x.shape[-2:]
        if h <= 2 * c or w <= 2 * c:
            raise ValueError(f"border crop of {c} px leaves nothing of a {h}x{w} image")
        x, y = x[..., c:-c, c:-c], y[..., c:-c, c:-c]
    if settings.color_space == "y":
        x, y = rgb_to_y(x, settings.data_range), rgb_to_y(y, settings.data_range)
    return x, y


def _piq() -> ModuleType:
    import piq

    return piq


def _channels_last(t: torch.Tensor) -> torch.Tensor:
    """Channels-last layout: piq's depthwise Gaussian convolutions run about 1.6x faster on CPU with it."""
    return t.contiguous(memory_format=torch.channels_last)


def psnr_scores(x: torch.Tensor, y: torch.Tensor, settings: MetricSettings) -> torch.Tensor:
    """PSNR (dB) per image ``(N,)`` of ``x`` against ``y``, both ``(N, C, H, W)`` in ``[0, data_range]``
    and already through :func:`crop_and_convert`. Identical images score 80 dB."""
    return _piq().psnr(x, y, data_range=settings.data_range, reduction="none")


def ssim_scores(x: torch.Tensor, y: torch.Tensor, settings: MetricSettings) -> torch.Tensor:
    """SSIM per image ``(N,)`` (channels averaged) of ``x`` against ``y``, both ``(N, C, H, W)`` in
    ``[0, data_range]`` and already through :func:`crop_and_convert`; both sides at least
    ``settings.ssim_kernel_size`` (``ValueError`` otherwise: the window is never shrunk)."""
    s = settings
    h, w = x.shape[-2:]
    if min(h, w) < s.ssim_kernel_size:
        raise ValueError(f"SSIM needs images of at least {s.ssim_kernel_size} px a side, got {h}x{w}")
    x, y = _channels_last(x), _channels_last(y)
    return _piq().ssim(x, y, kernel_size=s.ssim_kernel_size, kernel_sigma=s.ssim_kernel_sigma,
                       data_range=s.data_range, reduction="none", downsample=s.ssim_downsample)


def ms_ssim_scores(x: torch.Tensor, y: torch.Tensor, settings: MetricSettings) -> torch.Tensor:
    """MS-SSIM per image ``(N,)`` of ``x`` against ``y``, both ``(N, C, H, W)`` in ``[0, data_range]``
    and already through :func:`crop_and_convert`; sides at least :func:`ms_ssim_min_side` (161 px)."""
    s = settings
    x, y = _channels_last(x), _channels_last(y)
    return _piq().multi_scale_ssim(x, y, kernel_size=s.ssim_kernel_size, kernel_sigma=s.ssim_kernel_sigma,
                                   data_range=s.data_range, reduction="none")
