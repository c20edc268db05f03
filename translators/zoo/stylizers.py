"""Hidden procedural stylizers: the secret "style template" of the ``style-*`` victims.

A real style-transfer API is trained on a style set S the attacker never sees. Here the style is a
procedure whose outputs train the victim network; the attacker only sees the network's outputs, and
the evaluator may use the procedure as ground truth. Every operation is local (a few pixels of
context), so a small convolutional network can learn it.

All functions map ``(N, 3, H, W)`` float in [0, 1] to the same shape and range.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_LUMA = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)


def luma(x: torch.Tensor) -> torch.Tensor:
    """ITU-R BT.601 luma, ``(N, 1, H, W)``."""
    return (x * _LUMA.to(x)).sum(dim=1, keepdim=True)


def colour_grade(x: torch.Tensor, matrix: torch.Tensor, gamma: float, lift: torch.Tensor) -> torch.Tensor:
    """Per-pixel colour grading: ``(M @ rgb) ** gamma + lift``, clamped. ``matrix`` is 3x3, ``lift`` 3."""
    y = torch.einsum("ij,njhw->nihw", matrix.to(x), x).clamp(0, 1)
    return (y.pow(gamma) + lift.to(x).view(1, 3, 1, 1)).clamp(0, 1)


def soft_posterize(x: torch.Tensor, levels: int, sharpness: float = 12.0) -> torch.Tensor:
    """Smooth staircase quantisation to ``levels`` steps per channel (differentiable palette effect)."""
    s = x * (levels - 1)
    base = torch.floor(s)
    frac = s - base
    step = torch.sigmoid(sharpness * (frac - 0.5))
    return ((base + step) / (levels - 1)).clamp(0, 1)


def edge_strength(x: torch.Tensor) -> torch.Tensor:
    """Sobel gradient magnitude of the luma, ``(N, 1, H, W)``, roughly in [0, 4]."""
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], device=x.device).view(1, 1, 3, 3)
    ky = kx.transpose(-1, -2)
    g = F.pad(luma(x), (1, 1, 1, 1), mode="replicate")
    return torch.sqrt(F.conv2d(g, kx) ** 2 + F.conv2d(g, ky) ** 2 + 1e-8)


def ink_edges(x: torch.Tensor, threshold: float, softness: float, ink: tuple[float, float, float]) -> torch.Tensor:
    """Draw soft dark lines where the Sobel magnitude exceeds ``threshold``."""
    alpha = torch.sigmoid((edge_strength(x) - threshold) / softness)
    ink_t = torch.tensor(ink, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return x * (1 - alpha) + ink_t * alpha


def stylize_ink(x: torch.Tensor) -> torch.Tensor:
    """``style-ink``: warm grade, 6-level soft posterisation, dark-blue edge inking (a comic look)."""
    m = torch.tensor([[0.95, 0.10, 0.02], [0.05, 0.85, 0.05], [0.00, 0.10, 0.75]])
    graded = colour_grade(x, m, gamma=0.9, lift=torch.tensor([0.04, 0.02, 0.0]))
    smooth = F.avg_pool2d(F.pad(graded, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    poster = soft_posterize(smooth, levels=6)
    return ink_edges(poster, threshold=0.35, softness=0.06, ink=(0.10, 0.10, 0.22))


def stylize_teal(x: torch.Tensor) -> torch.Tensor:
    """``style-teal``: "teal and orange" cinema grade with an S-curve and a mild local-contrast boost."""
    m = torch.tensor([[1.10, -0.05, -0.05], [-0.05, 0.95, 0.10], [-0.10, 0.15, 0.95]])
    graded = colour_grade(x, m, gamma=1.0, lift=torch.tensor([0.0, 0.01, 0.03]))
    s_curve = graded * graded * (3 - 2 * graded)
    blur = F.avg_pool2d(F.pad(s_curve, (2, 2, 2, 2), mode="replicate"), 5, stride=1)
    return (s_curve + 0.6 * (s_curve - blur)).clamp(0, 1)


def stylize_grade(x: torch.Tensor) -> torch.Tensor:
    """``style-grade``: a per-pixel "learned LUT" look: saturation boost that spares saturated colours,
    half a filmic shoulder ``1.25 y / (y + 0.25)``, split toning (teal shadows, warm highlights)."""
    lum = luma(x)
    sat = x.amax(dim=1, keepdim=True) - x.amin(dim=1, keepdim=True)
    y = (lum + (x - lum) * (1.0 + 0.6 * (1.0 - sat))).clamp(0, 1)
    y = 0.5 * y + 0.625 * y / (y + 0.25)
    shadows, highlights = (1 - lum) ** 2, lum**2
    tone = shadows * torch.tensor([-0.04, 0.02, 0.07]).view(1, 3, 1, 1).to(x) \
        + highlights * torch.tensor([0.07, 0.02, -0.06]).view(1, 3, 1, 1).to(x)
    return (y + tone).clamp(0, 1)


def bilateral(x: torch.Tensor, radius: int = 2, sigma_s: float = 2.0, sigma_r: float = 0.12) -> torch.Tensor:
    """Edge-preserving bilateral filter (Tomasi & Manduchi 1998) over a ``(2r+1)^2`` window.

    Weights ``exp(-d^2 / 2 sigma_s^2) * exp(-|I_q - I_p|^2 / 2 sigma_r^2)`` with the colour distance
    summed over RGB; replicate padding."""
    k = 2 * radius + 1
    n, c, h, w = x.shape
    patches = F.unfold(F.pad(x, (radius,) * 4, mode="replicate"), k).view(n, c, k * k, h, w)
    ax = torch.arange(k, dtype=x.dtype, device=x.device) - radius
    spatial = torch.exp(-(ax.view(-1, 1) ** 2 + ax.view(1, -1) ** 2) / (2 * sigma_s**2)).view(1, k * k, 1, 1)
    rng = torch.exp(-((patches - x.unsqueeze(2)) ** 2).sum(1) / (2 * sigma_r**2))
    wgt = spatial * rng
    return (patches * wgt.unsqueeze(1)).sum(2) / wgt.sum(1, keepdim=True)


def stylize_toon(x: torch.Tensor) -> torch.Tensor:
    """``style-toon``: cartoon filter: two bilateral passes (flat regions, kept edges), a saturation
    boost, 8-level soft luma quantisation, dark difference-of-Gaussians outlines."""
    flat = bilateral(bilateral(x))
    lum = luma(flat)
    flat = (lum + (flat - lum) * 1.4).clamp(0, 1)
    q = soft_posterize(lum, levels=8, sharpness=8.0)
    flat = (flat * (q + 0.02) / (lum + 0.02)).clamp(0, 1)
    g = F.pad(luma(x), (2, 2, 2, 2), mode="replicate")
    dog = F.avg_pool2d(g[..., 1:-1, 1:-1], 3, stride=1) - F.avg_pool2d(g, 5, stride=1)
    line = torch.sigmoid((-dog - 0.03) / 0.01)
    return flat * (1 - 0.85 * line)


STYLIZERS = {"ink": stylize_ink, "teal": stylize_teal, "grade": stylize_grade, "toon": stylize_toon}
