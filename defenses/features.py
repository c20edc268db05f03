"""Feature taps shared by the perturbation defenses: named layers of the victim, or a torchvision network
loaded from a local file, read with forward hooks.

A :class:`LayerTap` runs a module up to one named layer and returns that layer's activation; the forward is
cut short there (the rest of the network is never run), so using the victim's early layers as a feature
network costs a fraction of a full forward.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from defenses.base import ModelAccessError

#: Activation modules: the default feature layer is the first one (the first non-linear feature map).
_ACTIVATIONS = (nn.ReLU, nn.PReLU, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.ELU, nn.Tanh, nn.Mish)

#: torchvision architectures FMD may use as a feature network (constructors without downloads).
TORCHVISION_ARCHS = ("resnet18", "vgg11", "squeezenet1_1", "mobilenet_v3_small", "alexnet")


class _StopForwardError(Exception):
    """Raised by a tap's hook to end the forward once the tapped activation is captured."""


def layer_names(module: nn.Module) -> list[str]:
    """Names of every sub-module of ``module`` (``""`` for the root excluded)."""
    return [n for n, _ in module.named_modules() if n]


def resolve_layer(module: nn.Module, name: str, owner: str) -> nn.Module:
    """The sub-module called ``name``; :class:`ModelAccessError` listing valid names when it does not exist."""
    mods = dict(module.named_modules())
    if not name or name not in mods:
        names = layer_names(module)
        shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
        raise ModelAccessError(f"{owner}: unknown layer {name!r}; valid layers: {shown}")
    return mods[name]


def default_feature_layer(module: nn.Module) -> str:
    """The first activation module's name (the first non-linear feature map); the first conv if none."""
    convs: list[str] = []
    for n, m in module.named_modules():
        if n and isinstance(m, _ACTIVATIONS):
            return n
        if n and isinstance(m, nn.Conv2d):
            convs.append(n)
    if not convs:
        raise ModelAccessError("the model has no activation or Conv2d layer to read features from")
    return convs[0]


class LayerTap:
    """Reads the activation of one named layer of ``module``: ``tap(x) -> (N, C, h, w)``.

    The forward stops at the layer (a hook raises after capturing), so only the layers before it run.
    Gradients flow through the returned activation when autograd is enabled.
    """

    def __init__(self, module: nn.Module, layer: str, owner: str) -> None:
        self.module = module
        self.layer = layer
        self.target = resolve_layer(module, layer, owner)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        captured: list[torch.Tensor] = []

        def hook(_m: nn.Module, _inp: Any, out: Any) -> None:
            captured.append(out[0] if isinstance(out, tuple) else out)
            raise _StopForwardError

        handle = self.target.register_forward_hook(hook)
        try:
            self.module(x)
        except _StopForwardError:
            pass
        finally:
            handle.remove()
        if not captured:
            raise ModelAccessError(f"layer {self.layer!r} was not reached by the forward pass")
        return captured[0]


def load_torchvision_features(arch: str, weights: str, device: torch.device, owner: str) -> nn.Module:
    """A torchvision ``arch`` with weights from the local safetensors file ``weights`` (no download), eval mode.

    Raises :class:`ModelAccessError` naming the missing file, or the mismatching keys.
    """
    if arch not in TORCHVISION_ARCHS:
        raise ModelAccessError(f"{owner}: feature arch {arch!r} is not supported; choose one of {TORCHVISION_ARCHS}")
    path = Path(weights).expanduser()
    if not path.is_file():
        raise ModelAccessError(
            f"{owner}: feature-network weights {str(path)!r} not found; write the state dict of a torchvision "
            f"{arch} as safetensors there (safetensors.torch.save_file(model.state_dict(), path)) or use "
            f"feature='victim'"
        )
    import torchvision.models as tvm
    from safetensors.torch import load_file

    net: nn.Module = getattr(tvm, arch)(weights=None)
    state = load_file(str(path), device="cpu")
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ModelAccessError(
            f"{owner}: {str(path)!r} is not a {arch} state dict (missing {list(missing)[:3]}, "
            f"unexpected {list(unexpected)[:3]})"
        )
    return net.eval().to(device).requires_grad_(False)


def middle_feature_layer(module: nn.Module) -> str:
    """The middle one of the model's activation modules (in forward-registration order); middle conv if none."""
    acts = [n for n, m in module.named_modules() if n and isinstance(m, _ACTIVATIONS)]
    if not acts:
        acts = [n for n, m in module.named_modules() if n and isinstance(m, nn.Conv2d)]
    if not acts:
        raise ModelAccessError("the model has no activation or Conv2d layer to amplify")
    return acts[len(acts) // 2]
