"""The architecture registry and helpers."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from translators.registry import Registry

ARCH_REGISTRY: Registry[nn.Module] = Registry("architecture")


def build_arch(name: str, kwargs: Mapping[str, Any] | None = None) -> nn.Module:
    """Build a registered architecture; ``kwargs`` are its constructor arguments."""
    # Importing the package registers every architecture.
    import translators.archs  # noqa: F401

    return ARCH_REGISTRY.build(name, kwargs)


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
