"""A 64-bit perceptual hash (DCT pHash) in numpy, for the query log.

Algorithm (Zauner 2010, "Implementation and benchmarking of perceptual image hash functions"; the
variant of the ``imagehash`` package): luma (ITU-R BT.601 weights) -> area-resample to 32x32 ->
orthonormal 2-D DCT-II -> keep the 8x8 lowest frequencies -> bit = coefficient > their median.
Near-duplicate images (re-encoded, lightly noised, slightly rescaled) have hashes a few bits apart;
unrelated images are about 32 bits apart. Compare with :func:`hamming`.
"""

from __future__ import annotations

from functools import cache

import numpy as np
import torch
import torch.nn.functional as F


@cache
def dct_matrix(n: int) -> np.ndarray:
    """Orthonormal DCT-II matrix ``C`` (n, n): ``C @ x`` is ``scipy.fft.dct(x, norm="ortho")``."""
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    c = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    c[0] /= np.sqrt(2.0)
    return c


def phash64(image: torch.Tensor, hash_size: int = 8, highfreq_factor: int = 4) -> str:
    """Perceptual hash of one image ``(1, 3, H, W)`` or ``(3, H, W)`` in [0, 1]; 16 hex digits (64 bits)."""
    x = image[0] if image.ndim == 4 else image
    if x.ndim != 3 or x.shape[0] != 3:
        raise ValueError(f"expected (3, H, W), got {tuple(image.shape)}")
    luma = (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2]).float()
    n = hash_size * highfreq_factor
    small = F.interpolate(luma[None, None], size=(n, n), mode="area")[0, 0].cpu().numpy().astype(np.float64)
    c = dct_matrix(n)
    coeffs = (c @ small @ c.T)[:hash_size, :hash_size]
    bits = (coeffs > np.median(coeffs)).flatten()
    value = 0
    for b in bits:
        value = (value << 1) | int(b)
    return f"{value:0{hash_size * hash_size // 4}x}"


def hamming(a: str, b: str) -> int:
    """Number of differing bits between two hex hashes of equal length."""
    if len(a) != len(b):
        raise ValueError("hashes of different lengths")
    return (int(a, 16) ^ int(b, 16)).bit_count()
