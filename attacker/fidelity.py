"""Fidelity of a surrogate against the victim's outputs: PSNR, SSIM, L2.

PSNR and SSIM come from ``piq`` on ``(N, 3, H, W)`` float tensors in [0, 1] with ``data_range=1``, no
border crop, RGB. SSIM uses piq's 11x11 Gaussian window (sigma 1.5) with ``downsample=False`` (plain
SSIM at every size; images with a side under 11 px fall back to the largest odd window that fits).
L2 is the mean squared error per pixel and channel in [0, 1] units.

The trivial baselines are bicubic upsampling (super-resolution) and the identity (same-size tasks).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from translators.images import upscale


def psnr_ssim_l2(pred: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """Mean PSNR (dB), SSIM and L2 over a batch ``(N, 3, H, W)``; identical images score 100 dB."""
    pred = pred.detach().float().clamp(0, 1).cpu()
    target = target.detach().float().clamp(0, 1).cpu()
    mse = F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))
    psnr = torch.where(mse > 0, 10 * torch.log10(1.0 / mse.clamp_min(1e-20)), torch.full_like(mse, 100.0))
    side = min(pred.shape[-2:])
    k = min(11, side if side % 2 else side - 1)
    if k >= 3:
        import piq  # here, not at the top: piq imports torchvision and torch._dynamo (~1 s of CLI start-up)

        ssim = piq.ssim(pred, target, data_range=1.0, kernel_size=k, downsample=False, reduction="none")
        ssim_v = float(ssim.mean())
    else:
        ssim_v = float("nan")
    return {"psnr": float(psnr.mean()), "ssim": ssim_v, "l2": float(mse.mean())}


def piq_psnr(pred: torch.Tensor, target: torch.Tensor) -> float:
    """PSNR through ``piq.psnr`` (data_range 1, mean over the batch) for reports that want piq's number."""
    import piq

    return float(piq.psnr(pred.clamp(0, 1), target.clamp(0, 1), data_range=1.0, reduction="mean"))


def baseline(x: torch.Tensor, scale: int) -> torch.Tensor:
    """The trivial translator: bicubic upsampling for ``scale > 1``, identity otherwise."""
    return upscale(x, scale) if scale > 1 else x


def module_size_multiple(module: nn.Module) -> int:
    return int(getattr(module, "size_multiple", 1) or 1)


@torch.no_grad()
def translate(module: nn.Module, x: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
    """Run ``module`` on ``x`` ``(N, 3, H, W)`` of any size: reflect-pad to its ``size_multiple``, crop back.

    Returns ``(N, 3, s*H, s*W)`` on the CPU, where ``s`` is the module's ``scale`` attribute (1 if absent).
    """
    device = device or next((p.device for p in module.parameters()), torch.device("cpu"))
    m = module_size_multiple(module)
    scale = int(getattr(module, "scale", 1) or 1)
    h, w = x.shape[-2:]
    ph, pw = (-h) % m, (-w) % m
    xi = x.to(device)
    if ph or pw:
        mode = "reflect" if ph < h and pw < w else "replicate"
        xi = F.pad(xi, (0, pw, 0, ph), mode=mode)
    y = module(xi)
    return y[..., : h * scale, : w * scale].float().cpu()


def psnr_from_l2(l2: float) -> float:
    return 100.0 if l2 <= 0 else 10 * math.log10(1.0 / l2)
