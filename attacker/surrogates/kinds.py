"""The built-in surrogate kinds: ``pix2pix``, ``srresnet`` and ``unet-l2`` (see :mod:`.base`)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from attacker.errors import ConfigError
from attacker.surrogates.base import RESTORATION_TASKS, SURROGATE_REGISTRY, Surrogate, SurrogateProfile
from translators.archs import build_arch

# The L2 U-Net has no normalisation: batch-norm running statistics gathered on the attacker's crops
# shifted colours on unseen photos (bench: 28.7 -> 32.3 dB surrogate-vs-victim for denoise25 at 256
# queries once removed). pix2pix keeps the paper's batch norm (it trained better with it here).
_UNET_PROFILES = {
    "tiny": SurrogateProfile(arch_kwargs={"base": 16, "depth": 4, "norm": "none"}, steps=300, batch=8, patch=32,
                             lr=2e-3),
    "small": SurrogateProfile(arch_kwargs={"base": 32, "depth": 5, "norm": "none"}, steps=600, batch=8, patch=64,
                              lr=1e-3),
    "default": SurrogateProfile(arch_kwargs={"base": 48, "depth": 6, "norm": "none"}, steps=2000, batch=16,
                                patch=64, lr=1e-3),
    "full": SurrogateProfile(arch_kwargs={"base": 64, "depth": 8, "norm": "none"}, steps=20000, batch=16,
                             patch=256, lr=2e-4),
}


@SURROGATE_REGISTRY.register("unet-l2")
class UNetL2(Surrogate):
    """U-Net trained with plain L2 (MSE) on random crops: the single-example imitation recipe.

    Restoration tasks (``denoise``, ``sr`` and the others in ``RESTORATION_TASKS``: the attacker knows
    the public task name) use a residual U-Net, output = clamp(x + tanh(.)) (for SR, x is the bicubic
    upsampling), the natural parameterisation when outputs resemble inputs; other tasks (style) use the
    plain sigmoid U-Net, which learns large colour changes much faster. The victim's architecture plays
    no part in this choice. ``arch_kwargs={"residual": ...}`` overrides it.
    """

    name = "unet-l2"
    profiles: ClassVar[dict[str, SurrogateProfile]] = _UNET_PROFILES

    def generator_spec(self) -> tuple[str, dict[str, Any]]:
        return self.unet_spec(residual=self.task in RESTORATION_TASKS or self.scale > 1)

    def setup(self) -> None:
        self.opt_g = self.adam(self.G.parameters())

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        return self.regression_step(x, y)


_P2P_PROFILES = {
    name: p.model_copy(update={
        "arch_kwargs": {**p.arch_kwargs, "norm": "batch"},
        "disc_kwargs": {"base": p.arch_kwargs["base"], "n_layers": {"tiny": 2, "small": 3}.get(name, 3),
                        "norm": "batch"},
        "betas": (0.5, 0.999),
        "lr": min(p.lr, 1e-3),
        "loss": "l1",
    })
    for name, p in _UNET_PROFILES.items()
}


@SURROGATE_REGISTRY.register("pix2pix")
class Pix2Pix(Surrogate):
    """pix2pix (Isola et al. 2017): U-Net generator, conditional PatchGAN on ``cat(x, y)``.

    ``L_D = 0.5 * (BCE(D(x, y), 1) + BCE(D(x, G(x)), 0))``;
    ``L_G = BCE(D(x, G(x)), 1) + lambda * L1(G(x), y)`` with ``lambda = 100`` (both papers).
    For SR the condition ``x`` is the bicubic upsampling of the input.
    """

    name = "pix2pix"
    profiles: ClassVar[dict[str, SurrogateProfile]] = _P2P_PROFILES

    def generator_spec(self) -> tuple[str, dict[str, Any]]:
        return self.unet_spec(residual=False)

    def setup(self) -> None:
        kw = {"in_ch": 6, **self.profile.disc_kwargs}
        try:
            self.D = build_arch("patchgan", kw).to(self.device)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"pix2pix: cannot build the PatchGAN with {kw}: {exc}") from None
        self.opt_g = self.adam(self.G.parameters())
        self.opt_d = self.adam(self.D.parameters())
        self.bce = nn.BCEWithLogitsLoss()

    def networks(self) -> dict[str, nn.Module]:
        return {"G": self.G, "D": self.D}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"G": self.opt_g, "D": self.opt_d}

    def _cond(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale > 1:
            return F.interpolate(x, scale_factor=self.scale, mode="bicubic", align_corners=False).clamp(0, 1)
        return x

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        c = self._cond(x)
        with self.autocast():
            fake = self.G(x)
        # discriminator
        self.opt_d.zero_grad(set_to_none=True)
        with self.autocast():
            d_real = self.D(torch.cat([c, y], 1)).float()
            d_fake = self.D(torch.cat([c, fake.detach()], 1)).float()
            loss_d = 0.5 * (self.bce(d_real, torch.ones_like(d_real)) + self.bce(d_fake, torch.zeros_like(d_fake)))
        self.scaler.scale(loss_d).backward()
        self.scaler.step(self.opt_d)
        # generator
        self.opt_g.zero_grad(set_to_none=True)
        with self.autocast():
            d_gen = self.D(torch.cat([c, fake], 1)).float()
            adv = self.bce(d_gen, torch.ones_like(d_gen))
            l1 = F.l1_loss(fake.float(), y)
            loss_g = adv + self.profile.lambda_l1 * l1
        self.scaler.scale(loss_g).backward()
        self.scaler.step(self.opt_g)
        self.scaler.update()
        return {"loss": float(l1.detach()), "l1": float(l1.detach()), "adv": float(adv.detach()),
                "loss_d": float(loss_d.detach()), "loss_g": float(loss_g.detach())}


@SURROGATE_REGISTRY.register("srresnet")
class SRResNetSurrogate(Surrogate):
    """SRResNet (Ledig et al. 2017) with an MSE loss (``loss="l1"`` in a profile switches to L1).

    Needs a super-resolution victim (scale 2, 4 or 8); use ``pix2pix`` or ``unet-l2`` otherwise.
    """

    name = "srresnet"
    profiles: ClassVar[dict[str, SurrogateProfile]] = {
        "tiny": SurrogateProfile(arch_kwargs={"channels": 16, "n_blocks": 2}, steps=300, batch=8, patch=16, lr=2e-3),
        "small": SurrogateProfile(arch_kwargs={"channels": 32, "n_blocks": 4}, steps=600, batch=8, patch=24, lr=1e-3),
        "default": SurrogateProfile(arch_kwargs={"channels": 64, "n_blocks": 8}, steps=2000, batch=16, patch=24,
                                    lr=5e-4),
        "full": SurrogateProfile(arch_kwargs={"channels": 64, "n_blocks": 16}, steps=20000, batch=16, patch=24,
                                 lr=1e-4),
    }

    def generator_spec(self) -> tuple[str, dict[str, Any]]:
        if self.scale not in (2, 4, 8):
            raise ConfigError(f"srresnet is a super-resolution surrogate (scale 2, 4 or 8); this victim has scale "
                              f"{self.scale}: use --arch pix2pix or --arch unet-l2")
        return "srresnet", {"scale": self.scale, "bicubic_skip": True, **self.profile.arch_kwargs}

    def setup(self) -> None:
        self.opt_g = self.adam(self.G.parameters())
        self.crit = F.l1_loss if self.profile.loss == "l1" else F.mse_loss

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        return self.regression_step(x, y, self.crit)


@SURROGATE_REGISTRY.register("resunet")
class ResUNetL2(Surrogate):
    """Residual U-Net (:class:`translators.archs.ResUNet`) trained with L2: the attacker's default.

    Output = input (or its bicubic upscale for SR) + a U-Net with a full-resolution path whose last conv
    starts at zero, so step 0 *is* the trivial baseline and every validation afterwards measures what
    training added (issue 14: 30.6 dB where the sigmoid ``unet-l2`` got 23.5 dB on the same 16 pairs).
    For SR the network runs at the output resolution, so crops shrink with the scale
    (:meth:`input_patch`).
    """

    name = "resunet"
    profiles: ClassVar[dict[str, SurrogateProfile]] = {
        "tiny": SurrogateProfile(arch_kwargs={"base": 16, "levels": 2, "convs": 1, "max_channels": 32}, steps=300,
                                 batch=8, patch=32, lr=2e-3),
        "small": SurrogateProfile(arch_kwargs={"base": 16, "levels": 3, "convs": 1, "max_channels": 64},
                                  steps=20000, batch=8, patch=64, lr=2e-3),
        "default": SurrogateProfile(arch_kwargs={"base": 32, "levels": 3, "convs": 1, "max_channels": 128},
                                    steps=50000, batch=8, patch=64, lr=1e-3),
        "full": SurrogateProfile(arch_kwargs={"base": 64, "levels": 4, "convs": 2, "max_channels": 256},
                                 steps=200000, batch=16, patch=128, lr=5e-4),
    }

    def generator_spec(self) -> tuple[str, dict[str, Any]]:
        return "resunet", {"in_ch": 3, "out_ch": 3, "scale": self.scale, **self.profile.arch_kwargs}

    def input_patch(self, patch: int) -> int:
        return patch if self.scale == 1 else max(12, 3 * patch // (2 * self.scale))

    def setup(self) -> None:
        self.opt_g = self.adam(self.G.parameters())

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        return self.regression_step(x, y)
