"""Feature-space amplification (ASVP, arXiv 2510.08925): amplify the top-k singular values of an internal
feature map of the victim by a factor ``h`` at run time.

The paper's observation: the dominant singular directions of a restoration network's feature maps carry
most of what a student learns from; scaling them by ``h`` makes the teacher's outputs a poor training
signal (student PSNR about -4 dB on SR, dehazing, deraining, low-light) while the teacher's own output
changes little. For a feature map ``F (C, H*W)`` of one image with SVD ``F = U S V^T``, the hook returns
``F + (h - 1) U_k S_k V_k^T`` (``k`` largest singular values times ``h``).

The defense re-runs the served model on the request's inputs with a temporary forward hook on ``layer``,
so it needs an eager module: models served from ``.safetensors`` (``ModelHandle.hookable``) work;
TorchScript and ``torch.export`` files are refused at start-up with :class:`ModelAccessError`.
The output is deterministic (no randomness): the same input always gives the same defended output.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from defenses.base import DefenseContext, DefenseParams, ModelAccessError, ModelHandle, OutputDefense
from defenses.features import middle_feature_layer, resolve_layer
from defenses.registry import DEFENSE_REGISTRY


class FeatureAmplifyParams(DefenseParams):
    """``layer``: the victim's layer to amplify (default: its middle activation). ``k``: singular values
    amplified, 1..64. ``h``: amplification factor, (1, 10]."""

    layer: str | None = None
    k: int = Field(2, ge=1, le=64)
    h: float = Field(1.5, gt=1.0, le=10.0)


def amplify_top_singular(feat: torch.Tensor, k: int, h: float) -> torch.Tensor:
    """``feat (N, C, H, W)`` -> same shape with each image's top-``k`` singular values of ``(C, H*W)`` times ``h``."""
    n, c = feat.shape[:2]
    m = feat.reshape(n, c, -1).float()
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    kk = min(k, s.shape[-1])
    top = (u[:, :, :kk] * s[:, None, :kk]) @ vh[:, :kk, :]
    return (m + (h - 1.0) * top).reshape(feat.shape).to(feat.dtype)


@DEFENSE_REGISTRY.register("feature_amplify")
class FeatureAmplifyDefense(OutputDefense):
    """Re-run the victim with its ``layer`` output's top-k singular values times ``h``: ``(N,3,sH,sW)`` out."""

    name = "feature_amplify"
    Params = FeatureAmplifyParams
    params: FeatureAmplifyParams
    needs_model = True

    def __init__(self, params: DefenseParams | None = None, **kwargs: object) -> None:
        super().__init__(params, **kwargs)
        self._model: ModelHandle | None = None
        self._target: torch.nn.Module | None = None
        self.layer: str | None = None

    def setup(self, device: torch.device, model: ModelHandle | None = None) -> None:
        if model is None:
            raise ModelAccessError("defense 'feature_amplify' needs the served model")
        model.require_hooks(self.name)
        self.layer = self.params.layer or middle_feature_layer(model.module)
        self._target = resolve_layer(model.module, self.layer, f"defense 'feature_amplify' on model {model.name!r}")
        self._model = model

    def apply(self, outputs: torch.Tensor, inputs: torch.Tensor, ctx: DefenseContext) -> torch.Tensor:
        return self.apply_batch(outputs, inputs, [ctx])

    def apply_batch(self, outputs: torch.Tensor, inputs: torch.Tensor, ctxs: object) -> torch.Tensor:
        """One hooked forward for the whole batch (rows are independent: the SVD is per image)."""
        if self._model is None or self._target is None:
            raise ModelAccessError("defense 'feature_amplify' used before setup()")
        p = self.params

        def hook(_m: torch.nn.Module, _inp: Any, out: Any) -> Any:
            if not isinstance(out, torch.Tensor) or out.dim() != 4:
                raise ModelAccessError(
                    f"defense 'feature_amplify': layer {self.layer!r} does not output a (N, C, H, W) feature map"
                )
            return amplify_top_singular(out, p.k, p.h)

        handle = self._target.register_forward_hook(hook)
        try:
            with torch.no_grad():
                y = self._model.module(inputs.to(self._model.device))
        finally:
            handle.remove()
        return y.to(device=outputs.device, dtype=outputs.dtype).clamp_(0.0, 1.0)
