"""The one supervised training loop for paired image translators: zoo victims' students, the MIA
reference model, and the model-level defenses (DMP, DP-SGD; AKD adds its discriminator through
``extra_step``).

``fit`` draws ``(x, y)`` batches from ``batches(step)``, minimises L1 or L2 with Adam and a cosine
schedule, and returns the final exponential moving average of the loss. Shapes: ``x``, ``y``
``(B, 3, H, W)`` in [0, 1].
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

Batches = Callable[[int], tuple[torch.Tensor, torch.Tensor]]
ExtraStep = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (x, y, G(x)) -> extra G loss
ProgressFn = Callable[[int, int, float], None]


def pixel_loss(kind: Literal["l1", "mse"]) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    return F.l1_loss if kind == "l1" else F.mse_loss


def fit(
    model: nn.Module,
    batches: Batches,
    steps: int,
    lr: float,
    loss: Literal["l1", "mse"] = "l1",
    weight: float = 1.0,
    device: torch.device | str = "cpu",
    optimizer: torch.optim.Optimizer | None = None,
    extra_step: ExtraStep | None = None,
    on_step: ProgressFn | None = None,
) -> float:
    """Train ``model`` for ``steps`` steps; returns the loss EMA. ``weight`` scales the pixel loss
    (pix2pix's lambda = 100 when ``extra_step`` adds an adversarial term)."""
    dev = torch.device(device)
    opt = optimizer or torch.optim.Adam(model.parameters(), lr=lr, betas=(0.5, 0.999) if extra_step else (0.9, 0.999))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / max(steps, 1))))
    fn = pixel_loss(loss)
    model.train()
    ema: float | None = None
    for step in range(steps):
        x, y = batches(step)
        x, y = x.to(dev), y.to(dev)
        out = model(x)
        pix = fn(out, y)
        total = weight * pix + (extra_step(x, y, out) if extra_step else 0.0)
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        sched.step()
        v = float(pix.detach())
        ema = v if ema is None else 0.95 * ema + 0.05 * v
        if on_step:
            on_step(step + 1, steps, ema)
    model.eval()
    return ema or 0.0
