"""Additive output noise (the "Gauss" output-perturbation defense of the AKD membership-privacy paper).

Noise of standard deviation ``sigma`` (in [0, 1] intensity units; 0.02 is about 5/255) is added to each
output and the result clamped to [0, 1]. Clamping shrinks the measured deviation only near black and
white. Kinds: ``gaussian`` N(0, sigma²); ``uniform`` U(-a, a) with a = sigma·√3; ``laplace`` with scale
b = sigma/√2 (all three have standard deviation ``sigma``).

Fresh noise per request is what the paper evaluates, but an attacker can then average repeated queries
(the error of the mean of k queries falls as sigma/√k). ``per_input = true`` draws the noise from a
generator keyed by (server secret, client, input hash), so repeating a query returns the very same
output and averaging gains nothing.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field

from defenses.base import DefenseContext, DefenseParams, OutputDefense
from defenses.registry import DEFENSE_REGISTRY


class NoiseParams(DefenseParams):
    """``sigma``: standard deviation in [0, 1] units. ``kind``: distribution. ``per_input``: see module doc."""

    sigma: float = Field(0.02, ge=0.0, le=1.0)
    kind: Literal["gaussian", "uniform", "laplace"] = "gaussian"
    per_input: bool = False


def sample_noise(shape: torch.Size, sigma: float, kind: str, rng: torch.Generator) -> torch.Tensor:
    """Zero-mean noise of standard deviation ``sigma`` drawn on the CPU from ``rng`` (float32)."""
    if kind == "gaussian":
        return torch.randn(shape, generator=rng).mul_(sigma)
    u = torch.rand(shape, generator=rng)
    if kind == "uniform":
        return u.mul_(2.0).sub_(1.0).mul_(sigma * math.sqrt(3.0))
    if kind == "laplace":
        # Inverse CDF: x = -b * sign(v) * log(1 - 2|v|), v = u - 1/2 in (-1/2, 1/2).
        v = u.sub_(0.5)
        b = sigma / math.sqrt(2.0)
        return -b * torch.sign(v) * torch.log1p(-2.0 * v.abs()).clamp_min(-60.0)
    raise ValueError(f"unknown noise kind {kind!r}")


@DEFENSE_REGISTRY.register("noise")
class NoiseDefense(OutputDefense):
    """``outputs + noise`` clamped to [0, 1]: ``(N, 3, H, W) -> (N, 3, H, W)``."""

    name = "noise"
    Params = NoiseParams
    params: NoiseParams

    def apply(self, outputs: torch.Tensor, inputs: torch.Tensor, ctx: DefenseContext) -> torch.Tensor:
        p = self.params
        if p.sigma == 0.0:
            return outputs
        rng = ctx.derived_rng("noise", ctx.client_id, ctx.input_sha256) if p.per_input else ctx.rng
        noise = sample_noise(outputs.shape, p.sigma, p.kind, rng).to(device=outputs.device, dtype=outputs.dtype)
        return (outputs + noise).clamp_(0.0, 1.0)
