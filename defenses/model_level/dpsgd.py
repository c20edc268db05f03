"""DP-SGD baseline (Abadi et al. 2016, via opacus): the victim retrained on its private set with
per-sample gradient clipping (``max_grad_norm``) and Gaussian gradient noise (``noise_multiplier``
sigma, relative to the clipping norm). akd-membership-privacy, section V-A3, picks two sigmas.

Batches are drawn uniformly with replacement (fixed size), not by Poisson sampling, so no epsilon is
claimed; the report states sigma as the paper does. Needs the ``privacy`` extra (``pip install opacus``).
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import torch

from defenses.model_level.common import ModelDefenseError, load_teacher, save_student, student_path
from translators.archs import build_arch
from translators.codecs import read_image
from translators.device import pick_device
from translators.training import fit


def private_pairs(split: dict, what: str = "members") -> tuple[torch.Tensor, torch.Tensor]:
    """The victim's private training pairs (inputs, targets) ``(N, 3, s, s)`` from its split folders."""
    root = Path(split[what]["dir"])
    names = sorted(p.name for p in (root / "inputs").glob("*.png"))
    if not names:
        raise ModelDefenseError(f"{root}: no private pairs to retrain on")
    return (torch.cat([read_image(root / "inputs" / n) for n in names]),
            torch.cat([read_image(root / "targets" / n) for n in names]))


def train_dpsgd(
    victim_path: str | Path, out: Path, *, name: str, noise_multiplier: float, max_grad_norm: float = 1.0,
    steps: int | None = None, seed: int = 0, device: str | torch.device = "cpu", batch: int = 8, lr: float = 2e-3,
) -> Path:
    """Retrain the victim's architecture from scratch on its private pairs with DP-SGD; save to ``out``."""
    if not (math.isfinite(noise_multiplier) and noise_multiplier > 0):  # as the campaign files require
        raise ModelDefenseError(f"--noise-multiplier {noise_multiplier}: give a finite noise sigma above 0 (with 0 "
                                "DP-SGD only clips gradients and the model has no privacy guarantee)")
    if not (math.isfinite(max_grad_norm) and max_grad_norm > 0):
        raise ModelDefenseError(f"--max-grad-norm {max_grad_norm}: the per-sample clipping norm must be above 0")
    try:
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer
    except ImportError:
        raise ModelDefenseError("DP-SGD needs opacus: pip install 'i2i-heist[privacy]'") from None
    victim, split = load_teacher(victim_path)
    student_path(out, victim)  # a bad --out fails before any training
    dev = pick_device(str(device))
    xs, ys = private_pairs(split)
    torch.manual_seed(seed)
    model = build_arch(victim.card.arch, victim.card.kwargs).to(dev)
    gsm = GradSampleModule(model)
    opt = DPOptimizer(torch.optim.Adam(gsm.parameters(), lr=lr), noise_multiplier=noise_multiplier,
                      max_grad_norm=max_grad_norm, expected_batch_size=batch)
    g = torch.Generator().manual_seed(seed)

    def batches(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(len(xs), (batch,), generator=g)
        return xs[idx], ys[idx]

    steps = steps or int(victim.card.training.get("steps", 1000))
    with warnings.catch_warnings():  # opacus' per-sample hooks on a first layer whose input needs no grad
        warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
        ema = fit(gsm, batches, steps, lr=lr, loss="l1", device=dev, optimizer=opt)
    return save_student(model, victim, out, name, "dpsgd", {
        "noise_multiplier": noise_multiplier, "max_grad_norm": max_grad_norm, "steps": steps, "batch": batch,
        "lr": lr, "seed": seed, "sampling": "uniform with replacement (no epsilon claimed)",
        "final_l1_ema": round(ema, 6)})
