"""Fidelity of a surrogate against the victim's outputs: PSNR, SSIM, L2.

PSNR and SSIM come from :mod:`translators.psnr_ssim` (piq; the implementation :mod:`evaluation.metrics`
uses) on ``(N, 3, H, W)`` float tensors clamped to [0, 1], with :data:`FIDELITY_SETTINGS`: ``data_range=1``,
no border crop, RGB, SSIM with an 11x11 Gaussian window (sigma 1.5) and ``downsample=False``. Identical
images score 80 dB (piq's ``1e-8`` floor on the normalised MSE), as in evaluation results. Images with a side
under 11 px get SSIM ``nan``: the window is never shrunk, so every SSIM reported is the same quantity.
L2 is the mean squared error per pixel and channel in [0, 1] units.

The trivial baselines are bicubic upsampling (super-resolution) and the identity (same-size tasks).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from translators.images import upscale
from translators.psnr_ssim import MetricSettings, crop_and_convert, psnr_scores, ssim_scores

#: How the attacker scores fidelity: the evaluator's defaults, spelled out.
FIDELITY_SETTINGS = MetricSettings(data_range=1.0, crop_border=0, color_space="rgb", ssim_kernel_size=11,
                                   ssim_kernel_sigma=1.5, ssim_downsample=False)


def psnr_ssim_l2(pred: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """Mean PSNR (dB), SSIM and L2 over a batch ``(N, 3, H, W)``; identical images score 80 dB.

    SSIM is ``nan`` when a side is under :data:`FIDELITY_SETTINGS`'s 11 px window.
    """
    pred = pred.detach().float().clamp(0, 1).cpu()
    target = target.detach().float().clamp(0, 1).cpu()
    mse = F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))
    x, y = crop_and_convert(pred, target, FIDELITY_SETTINGS)
    psnr = psnr_scores(x, y, FIDELITY_SETTINGS)
    if min(x.shape[-2:]) >= FIDELITY_SETTINGS.ssim_kernel_size:
        ssim_v = float(ssim_scores(x, y, FIDELITY_SETTINGS).mean())
    else:
        ssim_v = float("nan")
    return {"psnr": float(psnr.mean()), "ssim": ssim_v, "l2": float(mse.mean())}


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
