"""Adversarial Knowledge Distillation (AKD) and its DMP-style baseline (akd-membership-privacy, III).

A student G_s (the teacher's architecture, fresh weights) learns from the private teacher G_t on a
*proxy* set of public inputs (disjoint from the private set, checked), never seeing a private pair:

- eq. 4: ``L_Ds = E[log D_s(x, G_t(x))] + E[log(1 - D_s(x, G_s(x)))]`` (PatchGAN on ``cat(x, y)``);
- eq. 5: ``L_Gs = E[log D_s(x, G_s(x))] + lambda * E[|G_s(x) - G_t(x)|_1]``, lambda = 100; implemented
  as the non-saturating BCE form pix2pix uses.

``adversarial=False`` drops the discriminator: plain L1 distillation, the paper's DMP-based baseline.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from defenses.model_level.common import load_teacher, proxy_inputs, save_student, student_path
from translators.archs import build_arch
from translators.device import pick_device
from translators.training import fit

LAMBDA_L1 = 100.0


def distill(
    teacher_path: str | Path, out: Path, *, name: str, adversarial: bool = True, steps: int | None = None,
    seed: int = 0, device: str | torch.device = "cpu", proxy_images: str = "corpus:attacker",
    n_proxy: int | None = None, batch: int = 8, lr: float = 1e-3, lambda_l1: float = LAMBDA_L1,
) -> Path:
    """Train an AKD (or DMP if not ``adversarial``) student from ``teacher_path``; save it to ``out``.

    ``n_proxy``: proxy inputs (default 4 x the private set); ``lambda_l1``: the weight of the L1 term
    against the adversarial one (eq. 5; the paper's 100). ``bench/akd_sweep.py`` measures both.
    """
    if lambda_l1 <= 0:
        raise ValueError(f"lambda_l1 must be > 0, got {lambda_l1}")
    teacher, split = load_teacher(teacher_path)
    student_path(out, teacher)  # a bad --out fails before any training
    dev = pick_device(str(device))
    side = int(split["members"]["side"])
    n = n_proxy or 4 * int(split["members"]["n"])
    proxy = torch.cat(proxy_inputs(proxy_images, side, n, set(split["members"]["digests"]), seed))
    t_model = teacher.module.to(dev).eval()
    with torch.no_grad():
        targets = torch.cat([t_model(proxy[i : i + 32].to(dev)).clamp(0, 1).cpu() for i in range(0, len(proxy), 32)])
    torch.manual_seed(seed)
    student = build_arch(teacher.card.arch, teacher.card.kwargs).to(dev)
    g = torch.Generator().manual_seed(seed)

    def batches(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(len(proxy), (batch,), generator=g)
        return proxy[idx], targets[idx]

    steps = steps or int(teacher.card.training.get("steps", 1000))
    extra = None
    if adversarial:
        disc = build_arch("patchgan", {"in_ch": 6, "base": 32, "n_layers": 2, "norm": "none"}).to(dev)
        opt_d = torch.optim.Adam(disc.parameters(), lr=lr, betas=(0.5, 0.999))
        bce = nn.BCEWithLogitsLoss()

        def extra(x: torch.Tensor, y_t: torch.Tensor, y_s: torch.Tensor) -> torch.Tensor:
            d_t = disc(torch.cat([x, y_t], 1))
            d_s = disc(torch.cat([x, y_s.detach()], 1))
            loss_d = 0.5 * (bce(d_t, torch.ones_like(d_t)) + bce(d_s, torch.zeros_like(d_s)))  # eq. 4
            opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            opt_d.step()
            d_gen = disc(torch.cat([x, y_s], 1))
            return bce(d_gen, torch.ones_like(d_gen))  # adversarial half of eq. 5

    ema = fit(student, batches, steps, lr=lr, loss="l1", weight=lambda_l1 if adversarial else 1.0, device=dev,
              extra_step=extra)
    method = "akd" if adversarial else "dmp"
    return save_student(student, teacher, out, name, method, {
        "proxy_images": proxy_images, "proxy_pairs": n, "steps": steps, "batch": batch, "lr": lr, "seed": seed,
        "lambda_l1": lambda_l1 if adversarial else None, "final_l1_ema": round(ema, 6),
        "proxy_disjoint_checked": True})
