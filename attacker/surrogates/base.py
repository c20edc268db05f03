"""Surrogate models: what the attacker trains on harvested pairs.

A surrogate kind (registry :data:`SURROGATE_REGISTRY`) picks a generator architecture from
:mod:`translators.archs` *independently of the victim's* (the attacker never learns it), owns its
losses and optimisers, and performs one training step on a batch. Kinds:

- ``pix2pix``: U-Net generator + conditional PatchGAN, ``L_G = GAN + lambda * L1`` with lambda = 100
  (Isola et al. 2017; the extraction paper's style-transfer surrogate).
- ``srresnet``: SRResNet trained with MSE (or L1) for super-resolution (Ledig et al. 2017; the
  extraction paper's SR surrogate).
- ``unet-l2``: U-Net with a plain L2 loss (Spingarn-Eliezer & Michaeli, single-example imitation).
- ``resunet``: residual U-Net with a full-resolution path and L2 (issue 14); the default of ``auto``.

Sizes live in named profiles (``tiny`` for tests, ``small`` for CPU demos, ``default``, ``full`` for
GPUs); :class:`SurrogateProfile` holds them. Batches are ``(B, 3, p, p)`` inputs and
``(B, 3, s*p, s*p)`` targets in [0, 1]. Mixed precision (``amp``): on CUDA the forward passes run under
``torch.autocast`` (float16) with a ``GradScaler``; on a CPU with native bfloat16 (oneDNN reports it:
AVX512-BF16 or AMX) under bfloat16 autocast, about 2x faster per step on the build machine with channels-last
memory (``bench/attack_train.py``); elsewhere in float32. Networks and batches are channels-last.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from attacker.errors import ConfigError
from translators.archs import build_arch
from translators.registry import Registry, UnknownNameError

SURROGATE_REGISTRY: Registry[type[Surrogate]] = Registry("surrogate")
ArchValue = int | float | bool | str


class SurrogateProfile(BaseModel):
    """Sizes and optimisation settings of one profile.

    ``patch`` is the side of a training crop in *input* pixels; ``lr`` the Adam learning rate at the
    start of training (the trainer's schedule, :func:`attacker.train.lr_factor`, scales it down).
    """

    model_config = ConfigDict(extra="forbid")

    arch_kwargs: dict[str, ArchValue] = Field(default_factory=dict)
    disc_kwargs: dict[str, ArchValue] = Field(default_factory=dict)
    steps: int = Field(ge=1)
    batch: int = Field(ge=1)
    patch: int = Field(ge=4)
    lr: float = Field(gt=0)
    betas: tuple[float, float] = (0.9, 0.999)
    loss: Literal["l1", "mse"] = "mse"
    lambda_l1: float = Field(100.0, ge=0)


def amp_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast dtype for training on ``device``: float16 on CUDA, bfloat16 on a CPU whose oneDNN
    has native bfloat16 kernels, else None (float32: emulated bfloat16 would be slower)."""
    if device.type == "cuda":
        return torch.float16
    if device.type == "cpu" and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return torch.bfloat16
    return None


class Surrogate(ABC):
    """One surrogate kind, ready to train: generator ``G`` (+ any other nets), optimisers, a step.

    Args:
        scale: output/input size ratio of the victim (from ``GET /v1/models``).
        task: the victim's public task name (``sr``, ``denoise``, ``style`` or anything else).
        profile: sizes and optimiser settings.
        device: where to train.
        amp: mixed precision where the device runs it natively (:func:`amp_dtype`).
    """

    name: ClassVar[str]
    profiles: ClassVar[dict[str, SurrogateProfile]]

    def __init__(self, scale: int, task: str, profile: SurrogateProfile, device: torch.device,
                 amp: bool = True) -> None:
        self.scale = scale
        self.task = task
        self.profile = profile
        self.device = device
        self.amp_dtype = amp_dtype(device) if amp else None
        self.amp = self.amp_dtype is not None
        self.arch, self.arch_kwargs = self.generator_spec()
        try:
            self.G = build_arch(self.arch, self.arch_kwargs).to(device)
        except (TypeError, ValueError, UnknownNameError) as exc:
            msg = f"surrogate {self.name}: cannot build {self.arch} with {self.arch_kwargs}: {exc}"
            raise ConfigError(msg) from None
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.setup()
        for net in self.networks().values():
            net.to(memory_format=torch.channels_last)

    # --- what subclasses define ------------------------------------------------------------------
    @abstractmethod
    def generator_spec(self) -> tuple[str, dict[str, Any]]:
        """Registered architecture name and kwargs of the generator."""

    @abstractmethod
    def setup(self) -> None:
        """Create optimisers (and any discriminator)."""

    @abstractmethod
    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        """One optimisation step on inputs ``x`` ``(B, 3, p, p)`` and targets ``y`` ``(B, 3, sp, sp)``.

        Returns scalar losses; the key ``loss`` is the one reported in loss curves.
        """

    def networks(self) -> dict[str, nn.Module]:
        return {"G": self.G}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"G": self.opt_g}

    def input_patch(self, patch: int) -> int:
        """Training crop side (input pixels) for the profile's ``patch``; kinds working at the output
        resolution shrink it for SR."""
        return patch

    def patch_multiple(self) -> int:
        """Training crops (input pixels) must be multiples of this."""
        return int(getattr(self.G, "size_multiple", 1) or 1)

    # --- helpers -----------------------------------------------------------------------------------
    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.amp_dtype is not None:
            return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)
        return contextlib.nullcontext()

    def set_lr(self, factor: float) -> float:
        """Set every optimiser's rate to the profile's ``lr`` times ``factor``; returns that rate."""
        lr = self.profile.lr * factor
        for opt in self.optimizers().values():
            for group in opt.param_groups:
                group["lr"] = lr
        return lr

    def regression_step(self, x: torch.Tensor, y: torch.Tensor,
                        criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.mse_loss,
                        ) -> dict[str, float]:
        """One step of ``self.opt_g`` on ``criterion(G(x), y)`` (L2 by default), under autocast with the
        grad scaler: the whole ``train_step`` of the kinds without a discriminator."""
        self.opt_g.zero_grad(set_to_none=True)
        with self.autocast():
            loss = criterion(self.G(x).float(), y)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt_g)
        self.scaler.update()
        return {"loss": float(loss.detach())}

    def adam(self, params: Iterator[nn.Parameter]) -> torch.optim.Adam:
        return torch.optim.Adam(params, lr=self.profile.lr, betas=self.profile.betas)

    def train(self) -> None:
        for net in self.networks().values():
            net.train()

    def unet_spec(self, residual: bool) -> tuple[str, dict[str, Any]]:
        """U-Net generator: plain ``unet`` for same-size tasks, ``bicubic_unet`` when ``scale > 1``."""
        kw: dict[str, Any] = {"in_ch": 3, "out_ch": 3, **self.profile.arch_kwargs}
        kw.setdefault("residual", residual)
        if self.scale > 1:
            return "bicubic_unet", {"scale": self.scale, **kw}
        return "unet", kw


RESTORATION_TASKS = frozenset({"sr", "denoise", "deblur", "derain", "dehaze", "restore", "restoration", "jpeg"})


def get_surrogate(name: str) -> type[Surrogate]:
    import attacker.surrogates  # noqa: F401 - registers the built-in kinds

    try:
        return SURROGATE_REGISTRY.get(name)
    except UnknownNameError as exc:
        raise ConfigError(str(exc)) from None


def paper_kind(task: str, scale: int) -> str:
    """The source papers' surrogate for a task: ``srresnet`` for SR, ``unet-l2`` for denoising, else
    ``pix2pix``."""
    if scale > 1:
        return "srresnet"
    if task == "denoise":
        return "unet-l2"
    return "pix2pix"


def auto_candidates(task: str, scale: int) -> list[str]:
    """What ``--arch auto`` tries, first the default: ``resunet``, then the paper's surrogate."""
    return ["resunet", paper_kind(task, scale)]


def auto_kind(task: str, scale: int) -> str:
    """The default surrogate when there is no time to compare: ``resunet`` (best in bench/attack_fidelity)."""
    return auto_candidates(task, scale)[0]
