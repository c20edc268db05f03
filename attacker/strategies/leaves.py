"""Synthetic queries with natural-image statistics: dead leaves textured with the attacker's photos.

The dead-leaves model (Lee, Mumford & Huang 2001, "Occlusion models for natural images") stacks opaque
discs whose radii follow ``p(r) ~ r^-3``: the result has the scale invariance and occlusion edges of
photos. Achddou et al. (2021, "Synthetic images as a regularity prior for image restoration neural
networks") train restoration networks on such images alone. Here each leaf is filled with a piece of
one of the attacker's photos, so a handful of photos yields unboundedly many new compositions (new
edges between textures, textures at new places) for queries beyond what the photos hold.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import numpy as np
import torch

from translators.corpus import NamedImage
from translators.images import bicubic_resize


def power_law_radius(u: float, r_min: float, r_max: float, alpha: float = 3.0) -> float:
    """Inverse CDF of ``p(r) ~ r^-alpha`` on ``[r_min, r_max]`` at ``u`` in [0, 1) (``alpha != 1``)."""
    a, b = r_min ** (1.0 - alpha), r_max ** (1.0 - alpha)
    return (a + u * (b - a)) ** (1.0 / (1.0 - alpha))


def dead_leaves(h: int, w: int, sources: Sequence[NamedImage], rng: random.Random, *, r_min: float = 3.0,
                r_max: float | None = None, alpha: float = 3.0, max_leaves: int = 50_000) -> torch.Tensor:
    """A ``(1, 3, h, w)`` dead-leaves image in [0, 1] whose leaves are cut from ``sources``.

    Leaves are painted front to back (each covers only pixels no earlier leaf covered) until the canvas
    is full or ``max_leaves`` were drawn; pixels still bare then show the last leaf's photo. Radii in
    pixels: ``r_min`` .. ``r_max`` (default half the longer side). Deterministic in ``rng``.
    """
    r_max = float(r_max if r_max is not None else max(h, w) / 2)
    photos = [_hwc(im.image) for im in sources]
    canvas = np.zeros((h, w, 3), dtype=np.float32)
    free = np.ones((h, w), dtype=bool)
    n_free = h * w
    src = photos[0]
    for _ in range(max_leaves):
        r = power_law_radius(rng.random(), r_min, r_max, alpha)
        cy, cx = rng.uniform(-r, h + r), rng.uniform(-r, w + r)
        y0, y1 = max(0, math.floor(cy - r)), min(h, math.ceil(cy + r) + 1)
        x0, x1 = max(0, math.floor(cx - r)), min(w, math.ceil(cx + r) + 1)
        if y0 >= y1 or x0 >= x1:
            continue
        yy = np.arange(y0, y1, dtype=np.float32)[:, None] - cy
        xx = np.arange(x0, x1, dtype=np.float32)[None, :] - cx
        mask = (yy * yy + xx * xx <= r * r) & free[y0:y1, x0:x1]
        src = _cover(photos[rng.randrange(len(photos))], y1 - y0, x1 - x0)
        top, left = rng.randint(0, src.shape[0] - (y1 - y0)), rng.randint(0, src.shape[1] - (x1 - x0))
        patch = src[top : top + y1 - y0, left : left + x1 - x0]
        canvas[y0:y1, x0:x1][mask] = patch[mask]
        free[y0:y1, x0:x1] &= ~mask
        n_free -= int(mask.sum())
        if n_free == 0:
            break
    if n_free:
        canvas[free] = _cover(src, h, w)[:h, :w][free]
    return torch.from_numpy(canvas).permute(2, 0, 1).unsqueeze(0).clamp(0.0, 1.0).contiguous()


def _hwc(image: torch.Tensor) -> np.ndarray:
    """``(3, H, W)`` or ``(1, 3, H, W)`` tensor -> ``(H, W, 3)`` float32 array."""
    return image.reshape(-1, *image.shape[-3:])[0].permute(1, 2, 0).float().numpy().copy()


def _cover(photo: np.ndarray, h: int, w: int) -> np.ndarray:
    """``photo`` (``(H, W, 3)``), upscaled (bicubic) when it is smaller than ``h x w``."""
    if photo.shape[0] >= h and photo.shape[1] >= w:
        return photo
    f = max(h / photo.shape[0], w / photo.shape[1])
    size = (max(h, math.ceil(photo.shape[0] * f)), max(w, math.ceil(photo.shape[1] * f)))
    t = bicubic_resize(torch.from_numpy(photo).permute(2, 0, 1).unsqueeze(0), size)
    return _hwc(t.clamp(0.0, 1.0))


__all__ = ["dead_leaves", "power_law_radius"]
