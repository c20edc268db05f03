"""Full-reference image metrics: PSNR, SSIM and MS-SSIM (``piq`` underneath), per image.

The scoring itself (and :class:`MetricSettings`) lives in :mod:`translators.psnr_ssim`, shared with the
attacker and the zoo builder; this module adds input validation, one-line :class:`EvaluationError`
messages, the metric registry and reductions.

Inputs are float tensors ``(N, C, H, W)`` with values in ``[0, data_range]`` (Heist uses
``data_range=1.0``; it is always explicit and recorded with every result). Options shared by all
metrics (:class:`MetricSettings`):

- ``crop_border``: pixels removed from each side before scoring (SR papers crop ``scale`` pixels).
- ``color_space``: ``"rgb"`` scores all channels; ``"y"`` scores the ITU-R BT.601 luma used by SR
  papers (MATLAB ``rgb2ycbcr``): ``Y = (16 + 65.481 R + 128.553 G + 24.966 B) / 255`` for RGB in
  [0, 1], so Y lies in [16/255, 235/255] and the data range stays ``data_range``.
- ``ssim_downsample``: piq's optional average pooling by ``round(min(H, W) / 256)`` before SSIM (the
  MATLAB reference of Wang et al. 2004). Off by default, which matches scikit-image and BasicSR.

Formulas: PSNR ``= 10 log10(data_range^2 / MSE)`` over all pixels and channels of one image; piq adds
``1e-8`` to the normalised MSE, so identical images score 80 dB instead of infinity. SSIM: Wang et al.
2004 with an 11x11 Gaussian window (sigma 1.5), K1 0.01, K2 0.03, valid-region average, channels
averaged. MS-SSIM: Wang, Simoncelli & Bovik 2003, five scales with weights (0.0448, 0.2856, 0.3001,
0.2363, 0.1333); each image side must be at least ``(kernel_size - 1) * 16 + 1`` (161 px) after the
border crop.

Every metric comes as a function (``psnr``, ``ssim``, ``ms_ssim``; piq style, ``reduction``
``"none"|"mean"|"sum"``) and a class registered in :data:`METRICS` (``PSNR``, ``SSIM``, ``MSSSIM``)
whose call returns per-image scores ``(N,)``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import ClassVar, Literal

import torch

from evaluation.aggregate import ScoreAggregator
from evaluation.errors import EvaluationError
from translators.psnr_ssim import (
    MS_SSIM_WEIGHTS,
    ColorSpace,
    MetricSettings,
    crop_and_convert,
    ms_ssim_min_side,
    ms_ssim_scores,
    psnr_scores,
    ssim_scores,
)
from translators.psnr_ssim import rgb_to_y as _rgb_to_y
from translators.registry import Registry, UnknownNameError

Reduction = Literal["none", "mean", "sum"]
_RANGE_TOLERANCE = 1e-4  # float outputs may overshoot [0, data_range] by rounding; clamped after the check

__all__ = [
    "METRICS",
    "MSSSIM",
    "MS_SSIM_WEIGHTS",
    "PSNR",
    "SSIM",
    "ColorSpace",
    "ImageMetric",
    "MetricSettings",
    "ScoreAggregator",
    "build_metric",
    "ms_ssim",
    "ms_ssim_min_side",
    "prepare",
    "psnr",
    "rgb_to_y",
    "score_pairs",
    "ssim",
]


def rgb_to_y(x: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """ITU-R BT.601 luma of ``(N, 3, H, W)`` RGB in ``[0, data_range]`` -> ``(N, 1, H, W)``.

    ``Y = (16 * data_range + 65.481 R + 128.553 G + 24.966 B) / 255`` (MATLAB ``rgb2ycbcr``, as in
    SR papers; equals ``skimage.color.rgb2ycbcr(...)[..., 0] / 255`` for ``data_range=1``).
    :func:`translators.psnr_ssim.rgb_to_y` with an :class:`EvaluationError` for non-RGB input.
    """
    try:
        return _rgb_to_y(x, data_range)
    except ValueError as exc:
        raise EvaluationError(str(exc)) from None


def prepare(
    x: torch.Tensor, y: torch.Tensor, settings: MetricSettings, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate a pair of batches and apply crop and colour conversion.

    ``x`` (distorted) and ``y`` (reference): ``(N, C, H, W)`` with identical shapes, finite values in
    ``[0, data_range]`` (a ``1e-4 * data_range`` overshoot is clamped). One ``aminmax`` pass per tensor
    checks range and finiteness (NaN propagates into it, infinity is out of range). Returns ``dtype``
    tensors (float32 by default: the per-image scores agree with float64 references to about 1e-5).
    """
    for name, t in (("output", x), ("reference", y)):
        if not isinstance(t, torch.Tensor) or t.ndim != 4:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise EvaluationError(f"{name} must be a (N, C, H, W) tensor, got {shape}")
    if x.shape != y.shape:
        raise EvaluationError(f"output {tuple(x.shape)} and reference {tuple(y.shape)} differ in shape")
    if x.shape[0] == 0:
        raise EvaluationError("empty batch")
    dr = settings.data_range
    tol = _RANGE_TOLERANCE * dr
    out = []
    for name, t in (("output", x), ("reference", y)):
        t = t.detach().to(dtype)
        lo_t, hi_t = torch.aminmax(t)
        lo, hi = float(lo_t), float(hi_t)
        if math.isnan(lo) or math.isnan(hi):
            raise EvaluationError(f"{name} holds NaN values")
        if lo < -tol or hi > dr + tol:
            raise EvaluationError(
                f"{name} values span [{lo:.4g}, {hi:.4g}] but data_range is {dr:g}; "
                f"pass images in [0, {dr:g}] or set data_range"
            )
        out.append(t.clamp(0, dr) if lo < 0 or hi > dr else t)
    try:
        return crop_and_convert(out[0], out[1], settings)
    except ValueError as exc:
        raise EvaluationError(str(exc)) from None


def _reduce(scores: torch.Tensor, reduction: Reduction) -> torch.Tensor:
    if reduction == "none":
        return scores
    if reduction == "mean":
        return scores.mean()
    if reduction == "sum":
        return scores.sum()
    raise EvaluationError(f"unknown reduction {reduction!r}; use none, mean or sum")


def _settings(settings: MetricSettings | None, **kwargs: object) -> MetricSettings:
    return settings if settings is not None else MetricSettings(**kwargs)  # type: ignore[arg-type]


class ImageMetric:
    """Base class: a full-reference metric with fixed :class:`MetricSettings`.

    ``metric(x, y)`` returns per-image scores ``(N,)`` as float64 (on the inputs' device).
    """

    name: ClassVar[str]
    label: ClassVar[str]
    unit: ClassVar[str] = ""
    higher_is_better: ClassVar[bool] = True
    compute_dtype: ClassVar[torch.dtype] = torch.float32

    def __init__(self, settings: MetricSettings | None = None, **kwargs: object) -> None:
        self.settings = _settings(settings, **kwargs)

    def min_side(self) -> int:
        """Smallest image side accepted after the border crop."""
        return 1

    def check_size(self, h: int, w: int) -> str | None:
        """Why an ``h`` x ``w`` image (before cropping) cannot be scored, or None when it can."""
        c = self.settings.crop_border
        side = min(h, w) - 2 * c
        if side < self.min_side():
            return (f"{self.label} needs images of at least {self.min_side()} px a side after a {c}-px border crop, "
                    f"got {h}x{w}")
        return None

    def _score(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        reason = self.check_size(*x.shape[-2:]) if x.ndim == 4 else None
        if reason:
            raise EvaluationError(reason)
        xp, yp = prepare(x, y, self.settings, self.compute_dtype)
        with torch.no_grad():
            return self._score(xp, yp).to(torch.float64)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.settings.describe()})"


METRICS: Registry[ImageMetric] = Registry("image metric")


@METRICS.register("psnr")
class PSNR(ImageMetric):
    """Peak signal-to-noise ratio in dB (higher is better); per image ``(N,)``."""

    name = "psnr"
    label = "PSNR"
    unit = "dB"

    def _score(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return psnr_scores(x, y, self.settings)


@METRICS.register("ssim")
class SSIM(ImageMetric):
    """Structural similarity in [-1, 1] (higher is better); per image ``(N,)``, channels averaged."""

    name = "ssim"
    label = "SSIM"

    def min_side(self) -> int:
        return self.settings.ssim_kernel_size

    def _score(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return ssim_scores(x, y, self.settings)


@METRICS.register("ms_ssim")
class MSSSIM(ImageMetric):
    """Multi-scale SSIM (5 scales; higher is better); per image ``(N,)``. Needs >= 161 px sides."""

    name = "ms_ssim"
    label = "MS-SSIM"

    def min_side(self) -> int:
        return ms_ssim_min_side(self.settings)

    def _score(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return ms_ssim_scores(x, y, self.settings)


def build_metric(name: str, settings: MetricSettings | None = None) -> ImageMetric:
    """The metric registered as ``name`` (``psnr``, ``ssim``, ``ms_ssim``) with ``settings``."""
    try:
        factory = METRICS.get(name)
    except UnknownNameError as exc:
        raise EvaluationError(str(exc)) from None
    return factory(settings)


def psnr(
    x: torch.Tensor, y: torch.Tensor, *, data_range: float = 1.0, crop_border: int = 0,
    color_space: ColorSpace = "rgb", reduction: Reduction = "mean",
) -> torch.Tensor:
    """PSNR (dB) of ``x`` against reference ``y``, both ``(N, C, H, W)`` in ``[0, data_range]``."""
    s = MetricSettings(data_range=data_range, crop_border=crop_border, color_space=color_space)
    return _reduce(PSNR(s)(x, y), reduction)


def ssim(
    x: torch.Tensor, y: torch.Tensor, *, data_range: float = 1.0, crop_border: int = 0,
    color_space: ColorSpace = "rgb", kernel_size: int = 11, kernel_sigma: float = 1.5, downsample: bool = False,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """SSIM (Wang et al. 2004) of ``x`` against ``y``, both ``(N, C, H, W)`` in ``[0, data_range]``."""
    s = MetricSettings(data_range=data_range, crop_border=crop_border, color_space=color_space,
                       ssim_kernel_size=kernel_size, ssim_kernel_sigma=kernel_sigma, ssim_downsample=downsample)
    return _reduce(SSIM(s)(x, y), reduction)


def ms_ssim(
    x: torch.Tensor, y: torch.Tensor, *, data_range: float = 1.0, crop_border: int = 0,
    color_space: ColorSpace = "rgb", kernel_size: int = 11, kernel_sigma: float = 1.5, reduction: Reduction = "mean",
) -> torch.Tensor:
    """MS-SSIM (Wang, Simoncelli & Bovik 2003) of ``x`` against ``y``; sides >= 161 px after cropping."""
    s = MetricSettings(data_range=data_range, crop_border=crop_border, color_space=color_space,
                       ssim_kernel_size=kernel_size, ssim_kernel_sigma=kernel_sigma)
    return _reduce(MSSSIM(s)(x, y), reduction)


def score_pairs(
    pairs: Iterable[tuple[str, torch.Tensor, torch.Tensor]],
    metrics: Sequence[str] = ("psnr", "ssim"),
    settings: MetricSettings | None = None,
    capacity: int = 100_000,
) -> dict[str, ScoreAggregator]:
    """Score a stream of ``(name, output (1|N, C, H, W), reference)`` in constant memory.

    Images may differ in size from one item to the next. A batch item with N > 1 gets names
    ``name#0``, ``name#1``... Returns one :class:`ScoreAggregator` per metric.
    """
    settings = settings or MetricSettings()
    built = [build_metric(m, settings) for m in metrics]
    aggs = {m.name: ScoreAggregator(m.name, capacity=capacity) for m in built}
    for name, x, y in pairs:
        names = [name] if x.shape[0] == 1 else [f"{name}#{i}" for i in range(x.shape[0])]
        for m in built:
            aggs[m.name].add(m(x, y), names)
    return aggs
