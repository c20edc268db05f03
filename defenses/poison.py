"""Prediction poisoning for image outputs: perturb each output, within a PSNR floor, so that the gradient a
surrogate would receive from it points away from the gradient of the clean output.

Adapted from Orekondy et al., "Prediction Poisoning: Towards Defenses Against DNN Model Stealing Attacks"
(ICLR 2020, MAD), which perturbs probability vectors to maximise the angular deviation of the attacker's
parameter gradient. For a proxy surrogate ``s_theta`` trained with ``L(y) = ||s_theta(x) - y||^2`` the
parameter gradient is ``G(y) = 2 J^T (s_theta(x) - y)`` (``J = d s_theta(x) / d theta``), so a perturbed
target ``y + delta`` gives ``G(y + delta) = G(y) - 2 J^T delta``. The first-order choice that turns
``G(y + delta)`` furthest away from ``G(y)`` is ``delta ∝ J G(y)`` (a Jacobian-vector product of the proxy in
the direction of its own gradient), scaled so that ``RMS(delta) = 10^(-psnr/20)``: the honest user's
PSNR(defended, clean) is ``psnr`` dB (higher after clamping to [0, 1]).

The proxy surrogate is trained by the victim, offline, on its own outputs for synthetic smooth images
(:func:`train_proxy`), and cached as a safetensors checkpoint with a card in ``proxy_dir`` (default
``DATA/defenses/poison``); later starts load it. The output is deterministic per input (no randomness).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from torch.func import functional_call, jvp

from defenses.base import DefenseContext, DefenseParams, ModelAccessError, ModelHandle, OutputDefense
from defenses.registry import DEFENSE_REGISTRY
from translators.archs.registry import build_arch
from translators.checkpoint import ModelCard, load_model, save_checkpoint
from translators.errors import CheckpointError
from translators.paths import data_dir
from translators.seeding import seeded

log = logging.getLogger(__name__)
ProxyKind = Literal["auto", "resunet"]


class PoisonParams(DefenseParams):
    """``psnr``: honest-user PSNR floor in dB, [25, 80]. ``proxy_steps``: Adam steps training the proxy,
    10..20000. ``proxy_channels``: proxy width, 4..64. ``proxy_side``: input side of its training images,
    8..256. ``proxy_dir``: cache folder (default DATA/defenses/poison).
    ``proxy_seed``: seed of the proxy's training. ``proxy``: its architecture (:func:`proxy_arch`;
    ``auto``: SRResNet for SR, DnCNN for same-size victims; ``resunet``: the attacker's default kind)."""

    psnr: float = Field(40.0, ge=25.0, le=80.0)
    proxy_steps: int = Field(300, ge=10, le=20000)
    proxy_channels: int = Field(16, ge=4, le=64)
    proxy_side: int = Field(32, ge=8, le=256)
    proxy_dir: str | None = None
    proxy_seed: int = 0
    proxy: ProxyKind = "auto"


def synthetic_images(n: int, side: int, g: torch.Generator) -> torch.Tensor:
    """Smooth random images ``(n, 3, side, side)`` in [0, 1] with a few hard edges (proxy training data)."""
    low = torch.rand(n, 3, max(side // 8, 2), max(side // 8, 2), generator=g)
    x = F.interpolate(low, size=(side, side), mode="bicubic", align_corners=False)
    edges = (torch.rand(n, 1, 4, 4, generator=g) > 0.5).float()
    x = x + 0.3 * F.interpolate(edges, size=(side, side), mode="nearest") - 0.15
    return x.clamp_(0.0, 1.0)


def proxy_arch(scale: int, channels: int, kind: ProxyKind = "auto") -> tuple[str, dict[str, object]]:
    """Architecture (registry name, kwargs) of the proxy surrogate for a victim of output/input ``scale``."""
    if kind == "resunet":
        return "resunet", {"scale": scale, "base": channels, "levels": 2, "convs": 1, "max_channels": 2 * channels}
    if scale > 1:
        return "srresnet", {"scale": scale, "channels": channels, "n_blocks": 2}
    return "dncnn", {"channels": channels, "depth": 4, "batch_norm": False}


def train_proxy(model: ModelHandle, params: PoisonParams, batch: int = 8) -> nn.Module:
    """Train a proxy surrogate on the victim's own outputs (MSE, Adam 2e-3) for ``params.proxy_steps`` steps.

    Inputs are :func:`synthetic_images` of ``params.proxy_side`` px (rounded to the model's size multiple); returns the
    proxy in ``eval()`` mode on the CPU.
    """
    mult = int(model.card.get("size_multiple", 1) or 1)
    side = max(mult, (params.proxy_side // mult) * mult)
    arch, kwargs = proxy_arch(model.scale, params.proxy_channels, params.proxy)
    g = torch.Generator().manual_seed(params.proxy_seed)
    with seeded(params.proxy_seed):  # runs inside the server: its global generator is left as it was
        proxy = build_arch(arch, kwargs).train()
        opt = torch.optim.Adam(proxy.parameters(), lr=2e-3)
        for _ in range(params.proxy_steps):
            x = synthetic_images(batch, side, g)
            with torch.no_grad():
                y = model.module(x.to(model.device)).float().cpu().clamp(0.0, 1.0)
            loss = F.mse_loss(proxy(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return proxy.eval()


def proxy_path(model: ModelHandle, params: PoisonParams) -> Path:
    """Cache file of the proxy for ``model`` and ``params``: keyed by the model card and the proxy settings."""
    folder = Path(params.proxy_dir).expanduser() if params.proxy_dir else data_dir() / "defenses" / "poison"
    key = json.dumps(
        {"card": model.card, "steps": params.proxy_steps, "ch": params.proxy_channels, "seed": params.proxy_seed,
         # the key names ``proxy`` only when it is not the default, so caches written before it existed stay valid
         "side": params.proxy_side, **({"proxy": params.proxy} if params.proxy != "auto" else {})},
        sort_keys=True, default=str,
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return folder / f"proxy-{model.name}-{digest}.safetensors"


def load_or_train_proxy(model: ModelHandle, params: PoisonParams) -> nn.Module:
    """The cached proxy for ``model`` (safetensors, loaded without unpickling), trained and cached if missing."""
    path = proxy_path(model, params)
    if path.exists():
        try:
            return load_model(path).module
        except CheckpointError as exc:
            log.warning("poison proxy %s unreadable (%s); training a new one", path, exc)
    log.info("training the poison proxy for model %s (%d steps) -> %s", model.name, params.proxy_steps, path)
    proxy = train_proxy(model, params)
    arch, kwargs = proxy_arch(model.scale, params.proxy_channels, params.proxy)
    card = ModelCard(
        name=path.stem, arch=arch, kwargs=dict(kwargs), task=model.task, scale=model.scale,
        description=f"poison-defense proxy surrogate of {model.name}",
        training={"steps": params.proxy_steps, "seed": params.proxy_seed, "side": params.proxy_side,
                  "data": "synthetic smooth images"},
    )
    save_checkpoint(proxy, path, card)
    return proxy


@DEFENSE_REGISTRY.register("poison")
class PoisonDefense(OutputDefense):
    """``y + delta`` with ``delta ∝ J_proxy G(y)`` at RMS ``10^(-psnr/20)``: ``(N, 3, sH, sW)`` out."""

    name = "poison"
    Params = PoisonParams
    params: PoisonParams
    requires_grad = True
    needs_model = True

    def __init__(self, params: DefenseParams | None = None, **kwargs: object) -> None:
        super().__init__(params, **kwargs)
        self.proxy: nn.Module | None = None

    def setup(self, device: torch.device, model: ModelHandle | None = None) -> None:
        if model is None:
            raise ModelAccessError("defense 'poison' needs the served model (it trains a proxy on its outputs)")
        self.proxy = load_or_train_proxy(model, self.params).to(device).eval()

    def direction(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``J G(y)`` for one image: ``x (1, 3, H, W)`` input, ``y (1, 3, sH, sW)`` clean output -> like ``y``."""
        if self.proxy is None:
            raise ModelAccessError("defense 'poison' used before setup()")
        params = {k: v.detach() for k, v in self.proxy.named_parameters()}
        for v in params.values():
            v.requires_grad_(True)
        out = functional_call(self.proxy, params, (x,))
        loss = (out - y).pow(2).sum()
        grads = torch.autograd.grad(loss, list(params.values()))
        tangent = {k: g.detach() for k, g in zip(params, grads, strict=True)}
        primals = {k: v.detach() for k, v in params.items()}
        _, u = jvp(lambda p: functional_call(self.proxy, p, (x,)), (primals,), (tangent,))
        return u.detach()

    def apply(self, outputs: torch.Tensor, inputs: torch.Tensor, ctx: DefenseContext) -> torch.Tensor:
        rms = 10.0 ** (-self.params.psnr / 20.0)
        rows = []
        for i in range(outputs.shape[0]):
            y = outputs[i : i + 1].detach().float()
            u = self.direction(inputs[i : i + 1].float(), y)
            norm = u.pow(2).mean().sqrt()
            if not torch.isfinite(norm) or norm.item() < 1e-12:
                rows.append(y)  # no usable direction (proxy exact on this input): leave the output alone
                continue
            rows.append((y + u * (rms / norm)).clamp_(0.0, 1.0))
        return torch.cat(rows, 0).to(outputs.dtype)
