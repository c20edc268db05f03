"""Victim-zoo recipes: the task, the degradation / style, the architecture per profile, training settings.

A recipe is a small frozen description; :mod:`translators.zoo.build` trains it. Tasks mirror the
papers: ``sr4x`` (bicubic x4 super-resolution, SRResNet-like; extraction paper, SR case), ``denoise25``
(Gaussian sigma=25 on the 0..255 scale, DnCNN; single-example imitation paper), and ``style-*`` (photo
-> secret style, pix2pix-like U-Net; extraction paper, style case) whose template is a hidden stylizer.
Issue 14 added victims the attacker was never tuned on: ``style-grade`` (a per-pixel colour grade learned
by a residual CNN), ``style-toon`` (an edge-preserving cartoon filter) and ``sr2x``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from translators.corpus import PatchSampler
from translators.images import crop_to_multiple, downscale, quantize_8bit, upscale
from translators.registry import Registry
from translators.zoo.stylizers import STYLIZERS

Task = Literal["sr", "denoise", "style", "edges2photo"]
Profile = Literal["tiny", "default", "full"]
PROFILES: tuple[Profile, ...] = ("tiny", "default", "full")


@dataclass(frozen=True)
class TrainSpec:
    """Training settings of one profile. ``patch`` is the side of the *target* crop in pixels."""

    arch_kwargs: dict[str, Any]
    steps: int
    batch: int
    patch: int
    lr: float = 2e-3
    eval_side: int = 128  # evaluation crops (target side) on the benchmark split


@dataclass(frozen=True)
class Recipe:
    """One zoo victim. ``specs`` maps a profile to its :class:`TrainSpec`."""

    name: str
    task: Task
    arch: str
    description: str
    specs: dict[str, TrainSpec]
    scale: int = 1
    sigma: float = 0.0  # noise std on the [0, 1] scale (denoise)
    style: str = ""  # key in STYLIZERS (style)
    loss: Literal["l1", "mse"] = "l1"
    baseline: str = field(default="identity")

    def size_multiple(self, profile: str = "tiny") -> int:
        """What input sides must be a multiple of for this recipe's network at ``profile``."""
        from translators.archs import build_arch

        return int(build_arch(self.arch, self.specs[profile].arch_kwargs).size_multiple)

    # --- data ---------------------------------------------------------------------------------
    def make_pair(self, clean: torch.Tensor, seed: int = 0, multiple: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """``clean`` ``(N, 3, H, W)`` -> ``(input, target)`` as the victim is trained and evaluated on.

        SR: target is ``clean`` cropped to a multiple of the scale, input its bicubic downscale.
        Denoise: input is target + N(0, sigma^2), clamped and quantised to 8 bits (what an HTTP
        client would send). Style: input is the photo, target the hidden stylizer's output.
        ``multiple``: crop inputs so their sides are multiples of it (e.g. a U-Net's ``2**depth``).
        """
        if self.task == "sr":
            target = crop_to_multiple(clean, self.scale * multiple)
            return downscale(target, self.scale), target
        if self.task == "denoise":
            g = torch.Generator().manual_seed(seed)
            clean = crop_to_multiple(clean, multiple)
            noise = torch.randn(clean.shape, generator=g) * self.sigma
            noisy = quantize_8bit(clean + noise.to(clean))
            return noisy, clean
        target_in = crop_to_multiple(clean, multiple)
        return target_in, self.ground_truth(target_in)

    def ground_truth(self, x: torch.Tensor) -> torch.Tensor:
        """The hidden stylizer (style recipes only): the evaluator's ground truth."""
        if self.task != "style":
            raise ValueError(f"{self.name} has no stylizer; its ground truth is the clean image")
        return STYLIZERS[self.style](x)

    def training_sampler(self, images: list[torch.Tensor], spec: TrainSpec, seed: int) -> PatchSampler:
        """Where training crops come from: random crops of the victim split (membership recipes override)."""
        return PatchSampler(images, spec.patch, seed=seed)

    def card_extras(self, profile: str, checkpoint: Path, seed: int) -> dict[str, Any]:
        """Extra model-card fields written beside the checkpoint (membership recipes: the member split)."""
        return {}

    def baseline_output(self, inp: torch.Tensor) -> torch.Tensor:
        """The trivial baseline a victim must beat: bicubic upscaling for SR, identity otherwise."""
        return upscale(inp, self.scale) if self.task == "sr" else inp


ZOO: Registry[Recipe] = Registry("zoo model")
_RECIPES: dict[str, Recipe] = {}


def _add(recipe: Recipe) -> None:
    def factory() -> Recipe:
        return recipe

    ZOO.register(recipe.name)(factory)
    _RECIPES[recipe.name] = recipe


def get_recipe(name: str) -> Recipe:
    """The recipe named ``name``; raises :class:`~translators.registry.UnknownNameError` otherwise."""
    factory: Callable[[], Recipe] = ZOO.get(name)
    return factory()


_add(Recipe(
    name="sr4x",
    task="sr",
    arch="srresnet",
    scale=4,
    baseline="bicubic",
    loss="l1",
    description="bicubic x4 super-resolution (SRResNet, pixel shuffle, bicubic skip)",
    specs={
        "tiny": TrainSpec({"scale": 4, "channels": 16, "n_blocks": 2}, steps=800, batch=8, patch=48, lr=2e-3),
        "default": TrainSpec({"scale": 4, "channels": 24, "n_blocks": 3}, steps=1200, batch=8, patch=48, lr=2e-3),
        "full": TrainSpec({"scale": 4, "channels": 64, "n_blocks": 16}, steps=100_000, batch=16, patch=96,
                          lr=2e-4, eval_side=256),
    },
))
_add(Recipe(
    name="denoise25",
    task="denoise",
    arch="dncnn",
    sigma=25.0 / 255.0,
    loss="mse",
    description="Gaussian denoising, sigma=25 on 0..255 (DnCNN, residual learning)",
    specs={
        "tiny": TrainSpec({"channels": 24, "depth": 5, "batch_norm": False}, steps=300, batch=8, patch=40),
        "default": TrainSpec({"channels": 32, "depth": 7, "batch_norm": False}, steps=1000, batch=8, patch=40,
                             lr=1e-3),
        "full": TrainSpec({"channels": 64, "depth": 17, "batch_norm": True}, steps=100_000, batch=64, patch=50,
                          lr=1e-3, eval_side=256),
    },
))
def _style_specs() -> dict[str, TrainSpec]:
    """U-Net sizes per profile for style victims (residual output: starts at the identity)."""
    unet = {"norm": "none", "residual": True}
    return {
        "tiny": TrainSpec({**unet, "base": 16, "depth": 4, "max_channels": 64}, steps=600, batch=8, patch=48),
        "default": TrainSpec({**unet, "base": 24, "depth": 5, "max_channels": 96}, steps=1200, batch=8, patch=64,
                             lr=1e-3),
        "full": TrainSpec({"base": 64, "depth": 8, "max_channels": 512, "norm": "batch", "residual": True},
                          steps=100_000, batch=16, patch=256, lr=2e-4, eval_side=256),
    }


_add(Recipe(
    name="style-ink",
    task="style",
    arch="unet",
    style="ink",
    description="photo -> secret comic style (warm grade, posterisation, inked edges); pix2pix U-Net",
    specs=_style_specs(),
))
_add(Recipe(
    name="style-teal",
    task="style",
    arch="unet",
    style="teal",
    description="photo -> secret 'teal and orange' cinema grade with local contrast; pix2pix U-Net",
    specs=_style_specs(),
))


# --- victims the attacker was never tuned on (issue 14): another style kind each, and x2 SR -------------
_add(Recipe(
    name="style-grade",
    task="style",
    arch="dncnn",
    style="grade",
    loss="mse",
    description="photo -> secret colour grade (saturation curve, filmic shoulder, split toning); residual CNN",
    specs={
        "tiny": TrainSpec({"channels": 24, "depth": 4, "batch_norm": False}, steps=400, batch=8, patch=48),
        "default": TrainSpec({"channels": 32, "depth": 6, "batch_norm": False}, steps=1200, batch=8, patch=64,
                             lr=1e-3),
        "full": TrainSpec({"channels": 64, "depth": 12, "batch_norm": True}, steps=100_000, batch=16, patch=128,
                          lr=5e-4, eval_side=256),
    },
))
_add(Recipe(
    name="style-toon",
    task="style",
    arch="unet",
    style="toon",
    description="photo -> secret cartoon filter (bilateral smoothing, luma quantisation, DoG outlines); U-Net",
    specs=_style_specs(),
))
_add(Recipe(
    name="sr2x",
    task="sr",
    arch="srresnet",
    scale=2,
    baseline="bicubic",
    loss="l1",
    description="bicubic x2 super-resolution (SRResNet, pixel shuffle, bicubic skip)",
    specs={
        "tiny": TrainSpec({"scale": 2, "channels": 24, "n_blocks": 2}, steps=1000, batch=8, patch=64, lr=2e-3),
        "default": TrainSpec({"scale": 2, "channels": 24, "n_blocks": 3}, steps=1200, batch=8, patch=48, lr=2e-3),
        "full": TrainSpec({"scale": 2, "channels": 64, "n_blocks": 16}, steps=100_000, batch=16, patch=96,
                          lr=2e-4, eval_side=256),
    },
))
