"""An ordered list of output defenses, run with per-defense timing and a contract check after each."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from defenses.base import DefenseContext, ModelAccessError, ModelHandle, OutputDefense


class DefenseContractError(RuntimeError):
    """A defense returned a tensor of another shape, dtype or device (a bug in that defense)."""


@dataclass(frozen=True)
class DefenseTiming:
    """Wall time one defense took on one batch, in seconds (CUDA synchronised before reading the clock)."""

    name: str
    seconds: float


class DefensePipeline:
    """Runs ``defenses`` in order. Empty pipelines cost nothing.

    Gradient mode: a defense with ``requires_grad`` runs under ``torch.enable_grad()``, others under
    ``torch.no_grad()``. Outputs are clamped to [0, 1] and NaNs zeroed after each defense, so a sloppy
    defense cannot send out-of-range values to the encoder.
    """

    def __init__(self, defenses: Sequence[OutputDefense] = ()) -> None:
        self.defenses = list(defenses)

    def __len__(self) -> int:
        return len(self.defenses)

    def __bool__(self) -> bool:
        return bool(self.defenses)

    @property
    def names(self) -> list[str]:
        """``describe()`` of each defense, in order (what the query log records)."""
        return [d.describe() for d in self.defenses]

    @property
    def requires_grad(self) -> bool:
        return any(d.requires_grad for d in self.defenses)

    def setup(self, device: torch.device, model: ModelHandle | None = None) -> None:
        """Set every defense up for ``model`` on ``device``; a model-aware defense without a model is refused."""
        for d in self.defenses:
            if d.needs_model and model is None:
                raise ModelAccessError(f"defense {d.name!r} needs the served model, and none was given")
            d.setup(device, model)

    def apply(
        self, outputs: torch.Tensor, inputs: torch.Tensor, ctxs: Sequence[DefenseContext]
    ) -> tuple[torch.Tensor, list[DefenseTiming]]:
        """Apply every defense to ``outputs (N, 3, sH, sW)``; returns the result and one timing per defense."""
        timings: list[DefenseTiming] = []
        for d in self.defenses:
            t0 = time.perf_counter()
            grad = torch.enable_grad() if d.requires_grad else torch.no_grad()
            with grad:
                y = d.apply_batch(outputs, inputs, ctxs)
            if y.shape != outputs.shape or y.dtype != outputs.dtype or y.device != outputs.device:
                raise DefenseContractError(
                    f"defense {d.name} returned {tuple(y.shape)} {y.dtype} on {y.device}; expected "
                    f"{tuple(outputs.shape)} {outputs.dtype} on {outputs.device}"
                )
            outputs = torch.nan_to_num(y.detach(), nan=0.0).clamp_(0.0, 1.0)
            if outputs.device.type == "cuda":
                torch.cuda.synchronize(outputs.device)
            timings.append(DefenseTiming(d.name, time.perf_counter() - t0))
        return outputs, timings
