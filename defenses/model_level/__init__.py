"""Model-level defenses against membership inference: each trains a *new checkpoint* from the victim,
served like any other model (akd-membership-privacy, sections III and V).

- :mod:`.akd`: Adversarial Knowledge Distillation (student + PatchGAN on a proxy set, eq. 4-5);
- :mod:`.dmp`: distillation without the discriminator (the paper's DMP-based baseline);
- :mod:`.dpsgd`: the victim retrained on its private set with DP-SGD (opacus).

Gaussian output noise is the output defense ``noise`` (:mod:`defenses.noise`), not a model.
"""

from __future__ import annotations

from pathlib import Path

import torch

from defenses.model_level.common import ModelDefenseError


def build_model_defense(
    method: str, victim: str | Path, out: Path, *, name: str, steps: int | None = None,
    noise_multiplier: float | None = None, max_grad_norm: float = 1.0, seed: int = 0,
    device: str | torch.device = "cpu", proxy_images: str = "corpus:attacker", proxy_pairs: int | None = None,
) -> Path:
    """Train ``method`` (``akd``/``dmp``/``dpsgd``) from the victim checkpoint into ``out`` (cached)."""
    if out.exists() and out.with_suffix(".json").exists():
        return out
    if method in ("akd", "dmp"):
        from defenses.model_level.akd import distill

        return distill(victim, out, name=name, adversarial=method == "akd", steps=steps, seed=seed,
                       device=device, proxy_images=proxy_images, n_proxy=proxy_pairs)
    if method == "dpsgd":
        from defenses.model_level.dpsgd import train_dpsgd

        if noise_multiplier is None:
            raise ModelDefenseError("dpsgd needs a noise multiplier")
        return train_dpsgd(victim, out, name=name, noise_multiplier=noise_multiplier,
                           max_grad_norm=max_grad_norm, steps=steps, seed=seed, device=device)
    raise ModelDefenseError(f"unknown model-level defense {method!r} (akd, dmp, dpsgd)")


__all__ = ["ModelDefenseError", "build_model_defense"]
