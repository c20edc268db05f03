"""A keyed, block-periodic spread-spectrum carrier in a mid-frequency band of three decorrelated colour axes.

Embedding (spread spectrum after Cox et al. 1997, "Secure spread spectrum watermarking for multimedia";
tiling as in Kalker et al. 1999, "A video watermarking system for broadcast monitoring"; informed embedding
after Miller, Cox & Bloom 2002): ``K`` keyed patterns ``B_k (3, T, T)`` are drawn from the server secret,
band-limited to spatial frequencies ``band`` (cycles per tile, i.e. ``band / T`` cycles per pixel) and
orthonormalised. They live in an orthonormal opponent colour space (luma ``(R+G+B)/sqrt 3`` and two
chroma axes), so the watermark's mean squared error in RGB equals its energy there. A tile
``W = sum_k c_k B_k`` is repeated over the image from its top-left corner.

Why these choices: the band (2..6.5 cycles per 32-pixel tile = 0.06..0.2 cycles/pixel) lies below the
Nyquist limit of a 0.5x downscale and of 4:2:0 chroma subsampling, in the DCT frequencies JPEG 75 keeps;
the chroma axes carry much less image energy in that band than luma, so per unit of PSNR they carry
more signal; the periodic tiling turns a crop into a cyclic shift of the tile, which decoding finds by
trying all ``T*T`` shifts at once with FFT correlation.

Decoding: each colour axis (minus its mean) is folded into one ``T x T`` tile by summing all pixels with
the same coordinates modulo ``T``, so the watermark adds up coherently while the image does not. Each
(axis, frequency) is weighted by the inverse of the image's own power there (estimated from the
individual tiles): the matched filter for coloured host noise. Weighted least squares then gives the
tile coefficients at every cyclic shift (the weighted Gram matrix does not depend on the shift).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

from defenses.base import request_rng, request_seed

# Rows: orthonormal opponent axes (luma, red-green, yellow-blue); RGB = OPP.T @ opp.
OPP = torch.tensor(
    [
        [1 / math.sqrt(3)] * 3,
        [1 / math.sqrt(2), -1 / math.sqrt(2), 0.0],
        [1 / math.sqrt(6), 1 / math.sqrt(6), -2 / math.sqrt(6)],
    ],
    dtype=torch.float64,
)


@dataclass(frozen=True)
class Carrier:
    """``bases (K, 3, T, T)``: orthonormal band-limited patterns (opponent space, float32); ``spectra`` their
    2-D FFTs; ``band_mask (T, T)`` the frequencies used."""

    bases: torch.Tensor
    spectra: torch.Tensor
    band_mask: torch.Tensor

    @property
    def tile(self) -> int:
        return int(self.bases.shape[-1])

    @property
    def n_bits(self) -> int:
        return int(self.bases.shape[0])


def band_mask(tile: int, band: tuple[float, float]) -> torch.Tensor:
    """``(T, T)`` bool: FFT bins whose radius (cycles per tile) lies in ``band`` (DC excluded)."""
    f = torch.fft.fftfreq(tile) * tile
    r = torch.sqrt(f[:, None] ** 2 + f[None, :] ** 2)
    return (r >= band[0]) & (r <= band[1])


@lru_cache(maxsize=16)
def make_carrier(secret: int, n_bits: int, tile: int = 32, band: tuple[float, float] = (2.0, 6.5),
                 luma_share: float = 1 / 3) -> Carrier:
    """The keyed carrier of ``secret`` (same arguments, same patterns). ``ValueError`` if the band is too narrow."""
    mask = band_mask(tile, band)
    dof = 3 * int(mask.sum())  # real degrees of freedom of real patterns with this spectrum, 3 axes
    if n_bits > dof // 2:
        raise ValueError(f"a {tile}-pixel tile with band {band} holds {dof} degrees of freedom; too few for {n_bits}")
    g = request_rng(request_seed(secret, "heist-trace-carrier", str(tile), str(band)))
    noise = torch.randn(n_bits, 3, tile, tile, generator=g, dtype=torch.float64)
    share = torch.tensor([luma_share, (1 - luma_share) / 2, (1 - luma_share) / 2], dtype=torch.float64)
    noise = noise * share.sqrt().view(1, 3, 1, 1)
    pats = torch.fft.ifft2(torch.fft.fft2(noise) * mask).real.reshape(n_bits, -1)  # real: mask is symmetric
    q, _ = torch.linalg.qr(pats.T)  # orthonormal columns spanning band-limited patterns
    bases = q.T.reshape(n_bits, 3, tile, tile).contiguous()
    return Carrier(bases.float(), torch.fft.fft2(bases), mask)


def tile_over(tile: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Repeat ``tile (..., T, T)`` from the top-left corner to cover ``(..., h, w)``."""
    t = tile.shape[-1]
    reps = (1,) * (tile.dim() - 2) + (math.ceil(h / t), math.ceil(w / t))
    return tile.repeat(*reps)[..., :h, :w]


def to_rgb_delta(opp_tile: torch.Tensor) -> torch.Tensor:
    """``(3, T, T)`` opponent-space tile -> RGB ``(3, T, T)`` (orthonormal: same energy)."""
    return torch.einsum("cd,chw->dhw", OPP.to(opp_tile.dtype), opp_tile)


@dataclass(frozen=True)
class CarrierReading:
    """Soft bits read from an image: ``z (K,)`` z-scores at the found ``shift (dy, dx)``; ``sync_z`` the pilot
    correlation there, in standard deviations of its values at all shifts."""

    z: torch.Tensor
    shift: tuple[int, int]
    sync_z: float


def _fold(carrier: Carrier, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(FFT of the folded tile ``(3, T, T)``, per-tile host power ``(3, T, T)`` scaled to the fold, tile count)."""
    t = carrier.tile
    x = image.detach().reshape(-1, *image.shape[-3:])[0].double().cpu()
    h, w = x.shape[-2:]
    if h < t or w < t:
        raise ValueError(f"image is {w}x{h}; reading the watermark needs at least {t}x{t}")
    y = torch.einsum("dc,chw->dhw", OPP, x)
    res = y - y.mean(dim=(1, 2), keepdim=True)
    ph, pw = math.ceil(h / t) * t, math.ceil(w / t) * t
    padded = F.pad(res, (0, pw - w, 0, ph - h))
    folded = padded.view(3, ph // t, t, pw // t, t).sum(dim=(1, 3))  # every pixel into its (y mod T, x mod T)
    nh, nw = h // t, w // t
    tiles = res[:, : nh * t, : nw * t].reshape(3, nh, t, nw, t).permute(0, 1, 3, 2, 4).reshape(3, -1, t, t)
    count = h * w / (t * t)  # tiles summed into the fold (fractional for partial tiles)
    power = (torch.fft.fft2(tiles).abs() ** 2).mean(1) * count
    return torch.fft.fft2(folded), power, count


def _weights(carrier: Carrier, power: torch.Tensor, axes: tuple[int, ...]) -> torch.Tensor:
    """Matched-filter weights ``(3, T, T)``: 1 / host power in the band on ``axes``, 0 elsewhere."""
    band = carrier.band_mask
    weight = band.double() / (power + power[:, band].mean() * 1e-2)
    keep = torch.zeros(3, 1, 1, dtype=torch.float64)
    keep[list(axes)] = 1.0
    return weight * keep


def _gram(carrier: Carrier, weight: torch.Tensor) -> torch.Tensor:
    """Weighted Gram matrix ``(K, K)`` of the patterns (band bins only, real arithmetic)."""
    t, band = carrier.tile, carrier.band_mask
    b = carrier.spectra[:, :, band]  # (K, 3, nb) complex
    w = weight[:, band].sqrt()
    bw = torch.cat([(b.real * w).flatten(1), (b.imag * w).flatten(1)], dim=1)
    return bw @ bw.T / (t * t)


def _origin_corr(carrier: Carrier, spec: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Weighted correlation of the fold with every pattern at shift 0: ``(K,)``."""
    band = carrier.band_mask
    b = carrier.spectra[:, :, band]
    g = (spec * weight)[:, band]
    t = carrier.tile
    return (g.real[None] * b.real + g.imag[None] * b.imag).sum(dim=(1, 2)) / (t * t)


def coefficients(carrier: Carrier, image: torch.Tensor, axes: tuple[int, ...] = (0, 1, 2)) -> torch.Tensor:
    """Weighted least-squares estimates of the tile coefficients at every cyclic shift: ``(K, T*T)``.

    ``image``: ``(1, 3, H, W)`` or ``(3, H, W)`` in [0, 1], ``H, W >= T``. ``axes``: the colour axes used.
    Units: the amplitude ``c_k`` of a tile ``sum_k c_k B_k`` repeated over the image, so a watermark
    embedded with coefficients ``c`` reads back as about ``c`` at shift 0 (index 0), plus the image's own
    projection.
    """
    spec, power, count = _fold(carrier, image)
    weight = _weights(carrier, power, axes)
    k = carrier.n_bits
    corr = torch.fft.ifft2((spec * weight)[None] * carrier.spectra.conj()).real.sum(1).reshape(k, -1)  # (K, T*T)
    return torch.linalg.solve(_gram(carrier, weight), corr) / count


SHIFT0_Z = 2.5
"""Pilot z-score at shift 0 above which the tile origin is taken to be unmoved (one test, p ~ 0.006)."""

DECODERS: tuple[tuple[int, ...], ...] = ((0, 1, 2), (0,))
"""Colour axes each reading uses: all three, and luma alone (JPEG's 4:2:0 chroma subsampling and coarse
chroma quantisation wipe the chroma share, and a decoder that trusted the then quiet chroma would read noise)."""


def embed(carrier: Carrier, image: torch.Tensor, signs: torch.Tensor, strength: float,
          floor: float = 0.5, iters: int = 2, max_rms: float = 0.009) -> torch.Tensor:
    """Watermark ``image (1, 3, H, W)`` in [0, 1] with ``signs (K,)`` in {-1, +1}: informed embedding.

    ``strength`` is the per-pixel RMS (in [0, 1] units, RGB) that plain spread spectrum would add
    (``c_k = a s_k`` with ``a = strength * T * sqrt(3 / K)``). Here the image's own projection ``h_k`` is
    measured first, by every reading of :data:`DECODERS`, and each coefficient gets what it lacks for the
    weakest reading to see ``a s_k`` (a bit the image already leans towards costs little, one it opposes
    costs more), at least ``floor * a`` and at most ``3 a`` in the right direction. ``iters`` closed-loop
    passes correct for clipping to [0, 1] and partial tiles. The added pattern's RMS is capped at
    ``max_rms`` (0.009 = PSNR 40.9 dB) by scaling it down.
    """
    k, t = carrier.n_bits, carrier.tile
    h, w = image.shape[-2:]
    a = strength * t * math.sqrt(3.0 / k)
    s = signs.double()
    c = s * a
    out = image
    _, power, count = _fold(carrier, image)
    readers = []  # per decoder: weights and the Cholesky factor of its Gram matrix (from the clean image)
    for axes in DECODERS:
        weight = _weights(carrier, power, axes)
        readers.append((weight, torch.linalg.cholesky(_gram(carrier, weight))))
    for _ in range(iters + 1):
        spec = _fold(carrier, out)[0]
        got = torch.stack([
            torch.cholesky_solve(_origin_corr(carrier, spec, wt)[:, None], chol)[:, 0] / count
            for wt, chol in readers
        ])  # (D, K): what each decoder reads at shift 0
        deficit = (a - s * got).max(dim=0).values
        c = s * torch.clamp(s * c + deficit, min=floor * a, max=3 * a)
        tile = to_rgb_delta(torch.einsum("k,kchw->chw", c.float(), carrier.bases))
        rms = float(tile.pow(2).mean().sqrt())
        if rms > max_rms:
            tile = tile * (max_rms / rms)
        out = (image + tile_over(tile, h, w).to(image.device, image.dtype)).clamp(0.0, 1.0)
    return out


def _read(carrier: Carrier, image: torch.Tensor, pilot: torch.Tensor, axes: tuple[int, ...]) -> CarrierReading:
    est = coefficients(carrier, image, axes)
    t = carrier.tile
    est = est / est.std(dim=1, keepdim=True).clamp_min(1e-12)
    score = (pilot.double()[:, None] * est).sum(0)
    sz = (score - score.mean()) / score.std().clamp_min(1e-12)
    best = 0 if sz[0] >= SHIFT0_Z else int(sz.argmax())
    dy, dx = divmod(best, t)
    others = torch.cat([est[:, :best], est[:, best + 1 :]], dim=1)
    z = est[:, best] / others.std(dim=1).clamp_min(1e-12)
    return CarrierReading(z.float(), (dy, dx), float(sz[best]))


def read_carrier(carrier: Carrier, image: torch.Tensor, pilot: torch.Tensor) -> CarrierReading:
    """Soft bits of ``image (1, 3, H, W)`` in [0, 1]; ``pilot (K,)`` holds the known sign of each pilot
    coefficient and 0 elsewhere.

    Each reading of :data:`DECODERS` finds the tile origin as the cyclic shift where the pilot correlates
    best, except that shift 0 (no geometric change: re-encoding, resizing back, noise) is kept whenever its
    own pilot score passes :data:`SHIFT0_Z`, as the maximum over all shifts of an unmarked image's scores
    is itself about 3.3 standard deviations;
    the reading whose pilot stands out most is returned.
    """
    readings = [_read(carrier, image, pilot, axes) for axes in DECODERS]
    return max(readings, key=lambda r: r.sync_z)
