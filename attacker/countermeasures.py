"""Counter-measures of an adaptive thief against output perturbation: clean the harvested outputs before
training on them.

A counter-measure maps harvested outputs ``(N, 3, H, W)`` in [0, 1] to cleaned targets of the same shape.
It is chosen by a spec string ``KIND[:key=value,...]`` (``heist attack train --counter lowpass:sigma=1.5``):

- ``none``: train on the outputs as harvested.
- ``lowpass``: Gaussian blur of standard deviation ``sigma`` pixels (removes high-frequency perturbations;
  with the surrogate's L2 loss this is the "loss on a blurred target" of a robust-loss attacker).
- ``jpeg``: JPEG round trip at ``quality`` (Pillow, 4:2:0; :func:`translators.codecs.jpeg_roundtrip`), the
  classic adversarial-noise remover.
- ``median``: ``size`` x ``size`` median filter (removes sign/impulse patterns, keeps edges).
- ``aware``: defense-aware: estimates the perturbation amplitude ``a`` from the pairs as ``9/8`` times the
  median of ``|y - box3(y)|`` over all harvested pixels (``box3``: 3x3 mean; an i.i.d. +-eps perturbation on a
  smooth image leaves a residual of ``8/9 eps`` at the centre pixel, so ``a ~ eps``),
  then subtracts the estimated perturbation ``clamp(y - median3(y), -a, a)``: pixels whose high-pass
  residual is within the estimated amplitude are replaced by their median, edges larger than ``a`` lose
  only ``a``. ``amp`` fixes ``a`` instead of estimating it.

The attacker knows only URL, key and ``/v1/models``; none of these look at the victim.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from attacker.errors import ConfigError
from translators.codecs import jpeg_roundtrip
from translators.errors import first_problem
from translators.images import to_uint8_tensor

CounterKind = Literal["none", "lowpass", "jpeg", "median", "aware"]
COUNTER_KINDS: tuple[str, ...] = ("none", "lowpass", "jpeg", "median", "aware")


class CounterSpec(BaseModel):
    """A counter-measure and its parameters (see the module doc). ``sigma`` in pixels; ``amp`` in [0, 1] units."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: CounterKind = "none"
    sigma: float = Field(1.0, gt=0.0, le=8.0)
    quality: int = Field(75, ge=1, le=100)
    size: int = Field(3, ge=3, le=9)
    amp: float | None = Field(None, ge=0.0, le=0.5)

    def describe(self) -> str:
        extra = {"lowpass": f"sigma={self.sigma}", "jpeg": f"quality={self.quality}", "median": f"size={self.size}",
                 "aware": f"amp={self.amp}" if self.amp is not None else ""}.get(self.kind, "")
        return f"{self.kind}:{extra}" if extra else self.kind


def parse_counter(spec: str) -> CounterSpec:
    """``"lowpass:sigma=1.5"`` -> :class:`CounterSpec`; :class:`ConfigError` naming the valid kinds or field."""
    kind, _, rest = spec.strip().partition(":")
    fields: dict[str, str] = {"kind": kind}
    for part in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = part.partition("=")
        if not eq:
            raise ConfigError(f"counter-measure option {part!r} must look like key=value")
        fields[key.strip()] = value.strip()
    try:
        return CounterSpec.model_validate(fields)
    except ValidationError as exc:
        raise ConfigError(f"bad counter-measure {spec!r}: {first_problem(exc)} (kinds: {', '.join(COUNTER_KINDS)})"
                          ) from None


def gaussian_blur(y: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``(N, C, H, W)`` with reflect padding; kernel radius ``ceil(3 sigma)``."""
    r = max(1, int(np.ceil(3.0 * sigma)))
    t = torch.arange(-r, r + 1, dtype=y.dtype, device=y.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    c = y.shape[1]
    pad_h = min(r, y.shape[-2] - 1)
    pad_w = min(r, y.shape[-1] - 1)
    out = F.pad(y, (pad_w, pad_w, pad_h, pad_h), mode="reflect" if min(pad_h, pad_w) > 0 else "replicate")
    kw = k[r - pad_w : r + pad_w + 1].view(1, 1, 1, -1).repeat(c, 1, 1, 1)
    kh = k[r - pad_h : r + pad_h + 1].view(1, 1, -1, 1).repeat(c, 1, 1, 1)
    out = F.conv2d(out, kw, groups=c)
    return F.conv2d(out, kh, groups=c)


def median_filter(y: torch.Tensor, size: int = 3) -> torch.Tensor:
    """``size`` x ``size`` median of each channel of ``(N, C, H, W)`` (reflect padding; size odd)."""
    if size % 2 == 0:
        raise ValueError(f"median size must be odd, got {size}")
    p = size // 2
    n, c, h, w = y.shape
    padded = F.pad(y, (p, p, p, p), mode="reflect" if min(h, w) > p else "replicate")
    patches = F.unfold(padded.reshape(n * c, 1, h + 2 * p, w + 2 * p), size)  # (n*c, size*size, h*w)
    return patches.median(dim=1).values.reshape(n, c, h, w)


def estimate_amplitude(outputs: list[torch.Tensor]) -> float:
    """``9/8 median |y - box3(y)|`` over every pixel of the outputs (each ``(3, H, W)`` or ``(N, 3, H, W)``,
    float in [0, 1] or uint8); about ``eps`` for an i.i.d. +-eps perturbation of a smooth image."""
    vals = []
    for y in outputs:
        yb = y if y.dim() == 4 else y[None]
        yb = yb.float() / 255.0 if yb.dtype == torch.uint8 else yb.float()
        box = F.avg_pool2d(F.pad(yb, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
        vals.append((yb - box).abs().flatten())
    return float(torch.cat(vals).median()) * 9.0 / 8.0 if vals else 0.0


class CounterMeasure:
    """A fitted counter-measure: ``cm(y) -> cleaned y`` for ``(N, 3, H, W)`` in [0, 1] (same shape, in [0, 1])."""

    def __init__(self, spec: CounterSpec) -> None:
        self.spec = spec
        self.amplitude: float | None = spec.amp

    def fit(self, outputs: list[torch.Tensor]) -> CounterMeasure:
        """Estimate what the counter-measure needs from the harvested outputs (``aware``: the amplitude)."""
        if self.spec.kind == "aware" and self.spec.amp is None:
            self.amplitude = estimate_amplitude(outputs)
        return self

    def __call__(self, y: torch.Tensor) -> torch.Tensor:
        s = self.spec
        if s.kind == "none":
            return y
        if s.kind == "lowpass":
            out = gaussian_blur(y, s.sigma)
        elif s.kind == "jpeg":
            out = jpeg_roundtrip(y, s.quality)
        elif s.kind == "median":
            out = median_filter(y, s.size)
        else:
            if self.amplitude is None:
                raise ConfigError("the defense-aware counter-measure needs fit() on the harvested outputs first")
            residual = y - median_filter(y, 3)
            out = y - residual.clamp(-self.amplitude, self.amplitude)
        return out.clamp(0.0, 1.0)

    def apply_uint8(self, outputs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Clean a list of uint8 ``(3, H, W)`` outputs one by one (how :mod:`attacker.train` holds pairs)."""
        if self.spec.kind == "none":
            return outputs
        return [to_uint8_tensor(self(o[None].float().div(255.0))[0]) for o in outputs]


def build_counter(spec: str | CounterSpec) -> CounterMeasure:
    """A counter-measure from a spec string or :class:`CounterSpec` (not fitted yet)."""
    return CounterMeasure(parse_counter(spec) if isinstance(spec, str) else spec)
