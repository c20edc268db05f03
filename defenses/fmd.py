"""Feature Map Distortion (FMD) of outputs: PGD sign steps that push an output's features away from the clean
output's features while staying inside an L-inf ball around it.

Adapted from "feature map distortion" privacy protection (Algorithm 1 and Eq. 5 of the FMD paper: maximise
``J = MSE(f_feat(x*), f_feat(x)) - lambda * L_p(x*)`` with ``x*_{i+1} = clip_{x, eps}(x*_i + alpha * sign(grad J))``).
Here ``x`` is the victim's clean *output* ``y``, the authorized-model term ``L_p`` becomes a utility term
``MSE(y*, y)`` (honest users should get what the model computed), and the feature network ``f_feat`` is either

- ``feature = "victim"``: the victim's own layer ``layer`` (default: its first non-linear feature map) run on
  the output image; needs a hookable model (safetensors), or
- ``feature = "torchvision"``: a torchvision ``arch`` with weights from the local safetensors file
  ``weights`` (never downloaded), read at ``layer``.

Honest-user cost: sign steps drive most pixels to ``±eps``, so PSNR(defended, clean) is close to
``20 log10(1/eps)`` (eps 2/255 -> 42.1 dB, 3/255 -> 38.6 dB). Defaults (eps 2/255, 8 steps) were chosen
with ``bench/perturbation.py`` (docs/defenses.md), not copied from the paper (16/255 for classifiers).

The random start is drawn from a generator keyed by (server secret, client, input hash) when
``per_input`` is true, so repeating a query returns the same output and averaging repeats gains nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from pydantic import Field, model_validator

from defenses.base import DefenseContext, DefenseParams, ModelAccessError, ModelHandle, OutputDefense
from defenses.features import TORCHVISION_ARCHS, LayerTap, default_feature_layer, load_torchvision_features
from defenses.registry import DEFENSE_REGISTRY

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


class FmdParams(DefenseParams):
    """PGD settings in [0, 1] intensity units (eps 2/255 ~ 0.00784) and the feature network.

    ``eps``: L-inf radius, (0, 32/255]. ``alpha``: step size, (0, eps]; default ``eps / 4``.
    ``steps``: PGD iterations, 1..200. ``lam``: weight of the utility term (>= 0); both terms are relative energies:
    ``MSE(f(y*), f(y)) / mean(f(y)^2) - lam * MSE(y*, y) / mean(y^2)``.
    ``random_start``: start from a uniform point in the ball. ``per_input``: key the start by the input.
    ``feature``: ``victim`` or ``torchvision``. ``layer``: layer name (default: first activation of the victim;
    required for torchvision). ``arch``/``weights``: the torchvision network and its local safetensors file.
    """

    eps: float = Field(2.0 / 255.0, gt=0.0, le=32.0 / 255.0)
    alpha: float | None = Field(None, gt=0.0)
    steps: int = Field(8, ge=1, le=200)
    lam: float = Field(0.1, ge=0.0)
    random_start: bool = True
    per_input: bool = True
    feature: Literal["victim", "torchvision"] = "victim"
    layer: str | None = None
    arch: str = "resnet18"
    weights: str | None = None

    @model_validator(mode="after")
    def _check(self) -> FmdParams:
        if self.alpha is not None and self.alpha > self.eps:
            raise ValueError(f"alpha must be in (0, eps={self.eps:.5f}], got {self.alpha}")
        if self.feature == "torchvision":
            if self.arch not in TORCHVISION_ARCHS:
                raise ValueError(f"arch must be one of {TORCHVISION_ARCHS}, got {self.arch!r}")
            if not self.weights or not self.layer:
                raise ValueError("feature='torchvision' needs 'weights' (a local safetensors file) and 'layer'")
        return self

    @property
    def step(self) -> float:
        return self.alpha if self.alpha is not None else self.eps / 4.0


def start_noise(shape: torch.Size, eps: float, rng: torch.Generator) -> torch.Tensor:
    """Uniform ``U(-eps, eps)`` of ``shape`` drawn on the CPU from ``rng`` (float32)."""
    return torch.rand(shape, generator=rng).mul_(2.0 * eps).sub_(eps)


@DEFENSE_REGISTRY.register("fmd")
class FmdDefense(OutputDefense):
    """PGD feature-map distortion inside ``||y* - y||_inf <= eps``: ``(N, 3, H, W) -> (N, 3, H, W)``."""

    name = "fmd"
    Params = FmdParams
    params: FmdParams
    requires_grad = True
    needs_model = True

    def __init__(self, params: DefenseParams | None = None, **kwargs: object) -> None:
        super().__init__(params, **kwargs)
        self._tap: LayerTap | None = None
        self._normalise: tuple[torch.Tensor, torch.Tensor] | None = None

    def setup(self, device: torch.device, model: ModelHandle | None = None) -> None:
        p = self.params
        owner = "defense 'fmd'"
        if p.feature == "victim":
            if model is None:
                raise ModelAccessError("defense 'fmd' with feature='victim' needs the served model")
            model.require_hooks(self.name)
            layer = p.layer or default_feature_layer(model.module)
            self._tap = LayerTap(model.module, layer, f"{owner} on model {model.name!r}")
            self._normalise = None
        else:
            weights, layer = p.weights or "", p.layer or ""  # both required by FmdParams for torchvision
            net = load_torchvision_features(p.arch, weights, device, owner)
            self._tap = LayerTap(net, layer, f"{owner} ({p.arch})")
            mean = torch.tensor(_IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
            std = torch.tensor(_IMAGENET_STD, device=device).view(1, 3, 1, 1)
            self._normalise = (mean, std)

    def features(self, y: torch.Tensor) -> torch.Tensor:
        """Feature-network activation of images ``y (N, 3, H, W)`` in [0, 1]."""
        if self._tap is None:
            raise ModelAccessError("defense 'fmd' used before setup()")
        if self._normalise is not None:
            y = (y - self._normalise[0]) / self._normalise[1]
        return self._tap(y)

    def _rng(self, ctx: DefenseContext, row: str) -> torch.Generator:
        if self.params.per_input:
            return ctx.derived_rng("fmd", ctx.client_id, ctx.input_sha256, row)
        return ctx.rng

    def apply(self, outputs: torch.Tensor, inputs: torch.Tensor, ctx: DefenseContext) -> torch.Tensor:
        """All rows of one request (row ``i`` keyed by ``i`` as well, so rows get different starts)."""
        return self._pgd(outputs, [self._rng(ctx, str(i)) for i in range(outputs.shape[0])])

    def apply_batch(
        self, outputs: torch.Tensor, inputs: torch.Tensor, ctxs: Sequence[DefenseContext]
    ) -> torch.Tensor:
        """One PGD run for the whole batch; each row's loss is separate, so rows do not interact."""
        if len(ctxs) != outputs.shape[0]:
            raise ValueError(f"{len(ctxs)} contexts for a batch of {outputs.shape[0]}")
        return self._pgd(outputs, [self._rng(c, "0") for c in ctxs])

    def _pgd(self, outputs: torch.Tensor, rngs: Sequence[torch.Generator]) -> torch.Tensor:
        """PGD on ``outputs (N, 3, H, W)``; ``rngs[i]`` draws row ``i``'s random start."""
        p = self.params
        clean = outputs.detach().float()
        with torch.no_grad():
            target = self.features(clean).detach()
        if p.random_start:
            rows = [start_noise(clean[i : i + 1].shape, p.eps, g) for i, g in enumerate(rngs)]
            y = (clean + torch.cat(rows, 0).to(clean.device)).clamp_(0.0, 1.0)
        else:
            y = clean.clone()
        dims = tuple(range(1, clean.dim()))
        fdims = tuple(range(1, target.dim()))
        # Both terms relative to their clean energy, so lam weighs them on one scale whatever the layer.
        feat_energy = target.pow(2).mean(dim=fdims).clamp_min(1e-8)
        pix_energy = clean.pow(2).mean(dim=dims).clamp_min(1e-8)
        for _ in range(p.steps):
            y.requires_grad_(True)
            feat = self.features(y)
            distortion = (feat - target).pow(2).mean(dim=fdims) / feat_energy
            utility = (y - clean).pow(2).mean(dim=dims) / pix_energy
            objective = (distortion - p.lam * utility).sum()
            (grad,) = torch.autograd.grad(objective, y)
            with torch.no_grad():
                y = y.detach() + p.step * grad.sign()
                y = torch.minimum(torch.maximum(y, clean - p.eps), clean + p.eps).clamp_(0.0, 1.0)
        return y.detach().to(outputs.dtype)
