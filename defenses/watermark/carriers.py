"""Carriers of the ownership watermark: the keyed feature maps a mark is built from.

``ring`` (the default): ring differences of radius ``r`` (:func:`ring_features`); ``band``: difference-of-
Gaussian octaves modulated by tone functions of the local luminance (:func:`band_features`). Every carrier
commutes with flips and 90-degree rotations. Shapes: images ``(N, 3, H, W)`` in [0, 1] ->
``(N, n_features, H, W)``.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Literal

import torch
import torch.nn.functional as F

#: Offsets smaller than this many pixels from the image border use reflected content.
_PAD_MODE = "reflect"


@lru_cache(maxsize=8)
def ring_kernels(radius: int) -> torch.Tensor:
    """The ``n_orbits`` ring-difference kernels ``(n_orbits, 1, 2r+1, 2r+1)`` (float64, each sums to 0).

    Orbits of the dihedral group D4 on the offsets ``(i, j)``, ``0 < max(|i|, |j|) <= r``: an orbit is the
    set of offsets with the same ``(max(|i|,|j|), min(|i|,|j|))``. Kernel ``o`` = (indicator of the orbit) /
    (orbit size) minus a unit impulse at the centre.
    """
    if radius < 1:
        raise ValueError("radius must be >= 1")
    side = 2 * radius + 1
    orbits: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for i in range(-radius, radius + 1):
        for j in range(-radius, radius + 1):
            if i == 0 and j == 0:
                continue
            a, b = abs(i), abs(j)
            orbits.setdefault((max(a, b), min(a, b)), []).append((i, j))
    kernels = []
    for key in sorted(orbits):
        k = torch.zeros(side, side, dtype=torch.float64)
        for i, j in orbits[key]:
            k[i + radius, j + radius] = 1.0 / len(orbits[key])
        k[radius, radius] -= 1.0
        kernels.append(k)
    return torch.stack(kernels).unsqueeze(1)


TONE_FREQS = 4

#: Carriers: ``ring`` (ring differences of radius ``r``) or ``band`` (difference-of-Gaussian octaves
#: modulated by tone functions of the local luminance; see :func:`band_features`).
Carrier = Literal["ring", "band"]

#: ``band`` carrier: the finest octave's Gaussian sigma (pixels) and the luminance tone frequencies.
BAND_SIGMA0 = 1.0
BAND_TONES = 2


def n_features(radius: int, carrier: str = "ring", scales: tuple[int, ...] = (1,)) -> int:
    """Feature maps per image: 3 input channels x (ring orbits x ``len(scales)``, or 2 * TONE_FREQS at
    ``radius = 0``; for the ``band`` carrier: ``radius`` octaves x (1 + 2 * BAND_TONES) tone functions)."""
    if carrier == "band":
        return 3 * radius * (1 + 2 * BAND_TONES)
    return 3 * (ring_kernels(radius).shape[0] * len(scales) if radius > 0 else 2 * TONE_FREQS)


@lru_cache(maxsize=16)
def _gauss1d(sigma: float) -> torch.Tensor:
    half = max(1, math.ceil(3.0 * sigma))
    t = torch.arange(-half, half + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def gaussian_blur(y: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``y (N, C, H, W)``, reflect-padded (replicate where the image is smaller
    than the kernel). Commutes with flips and 90-degree rotations."""
    k = _gauss1d(sigma).to(device=y.device, dtype=y.dtype)
    half = (k.numel() - 1) // 2
    n, c, h, w = y.shape
    mode = _PAD_MODE if min(h, w) > half else "replicate"
    z = F.pad(y.reshape(n * c, 1, h, w), (half, half, half, half), mode=mode)
    z = F.conv2d(z, k.view(1, 1, 1, -1))
    z = F.conv2d(z, k.view(1, 1, -1, 1))
    return z.reshape(n, c, h, w)


def band_features(y: torch.Tensor, octaves: int) -> torch.Tensor:
    """``y (N, 3, H, W)`` -> ``(N, 3 * octaves * (1 + 2 * BAND_TONES), H, W)``: band-pass octaves modulated by
    tone functions of the local luminance.

    Octave ``j``: ``D_j = G_{s_j}(y) - G_{2 s_j}(y)`` with ``s_j = BAND_SIGMA0 * 2^j`` pixels (difference of
    Gaussians, Lowe 2004), a band from ~6 to ~25 px periods at ``j = 0`` -- below JPEG's and an innocent
    surrogate's high-frequency errors. Tones: ``1, cos(2 pi m L), sin(2 pi m L)`` for ``m = 1..BAND_TONES``
    with ``L = G_2(mean over channels of y)`` (content-adaptive sign; multiplies the key's dimension).
    Everything is isotropic, so the features commute with flips and 90-degree rotations. Feature index
    ``c' * n + j * T + t`` (``n`` per channel, ``T`` tones).
    """
    lum = gaussian_blur(y.mean(1, keepdim=True), 2.0)
    tones = [torch.ones_like(lum)]
    for m in range(1, BAND_TONES + 1):
        a = 2 * math.pi * m * lum
        tones += [a.cos(), a.sin()]
    tone = torch.cat(tones, 1)  # (N, T, H, W)
    blurs = [gaussian_blur(y, BAND_SIGMA0 * 2.0**j) for j in range(octaves + 1)]
    feats = []
    for c in range(y.shape[1]):
        for j in range(octaves):
            feats.append((blurs[j][:, c : c + 1] - blurs[j + 1][:, c : c + 1]) * tone)
    return torch.cat(feats, 1)


def features(y: torch.Tensor, radius: int, carrier: str = "ring", scales: tuple[int, ...] = (1,)) -> torch.Tensor:
    """The carrier's feature maps of ``y (N, 3, H, W)`` (``ring``: :func:`ring_features` at every scale of
    ``scales``, index ``(c' * len(scales) + j) * n_orbits + o``; ``band``: :func:`band_features` with ``radius``
    octaves)."""
    if carrier == "band":
        return band_features(y, radius)
    if radius <= 0 or tuple(scales) == (1,):
        return ring_features(y, radius)
    n, c, h, w = y.shape
    per = [ring_features(y, radius, s).reshape(n, c, -1, h, w) for s in scales]
    return torch.stack(per, 2).flatten(1, 3)


def ring_features(y: torch.Tensor, radius: int, scale: int = 1) -> torch.Tensor:
    """``y (N, 3, H, W)`` -> ``(N, 3 * n_orbits, H, W)``: every ring difference of every colour channel.

    ``scale > 1``: the ring at ``scale`` times its size -- offsets dilated by ``scale``, of ``y`` blurred by a
    Gaussian of sigma ``scale / 2`` px first (no aliasing), a band around periods of ``4 * scale`` px that
    JPEG's quantiser and chroma subsampling keep (docs/defenses.md, "Surviving JPEG"). Still commutes with
    flips and 90-degree rotations. Feature index ``c' * n_orbits + o``. Borders are reflect-padded
    (H, W > radius * scale required; replicate otherwise).
    """
    if radius <= 0:
        m = torch.arange(1, TONE_FREQS + 1, device=y.device, dtype=y.dtype).view(1, 1, -1, 1, 1)
        a = 2 * math.pi * m * y.unsqueeze(2)
        return torch.cat([a.sin(), a.cos()], 2).flatten(1, 2)
    ker = ring_kernels(radius).to(device=y.device, dtype=y.dtype)
    if scale > 1:
        y = gaussian_blur(y, 0.5 * scale)
    n, c, h, w = y.shape
    reach = radius * scale
    mode = _PAD_MODE if min(h, w) > reach else "replicate"
    pad = F.pad(y.reshape(n * c, 1, h, w), (reach,) * 4, mode=mode)
    return F.conv2d(pad, ker, dilation=scale).reshape(n, c * ker.shape[0], h, w)
