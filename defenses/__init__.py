"""Output defenses: post-processing a victim applies to its outputs before they leave the server.

A defense is a small :class:`OutputDefense` subclass with a ``name``, validated pydantic ``Params`` and
``apply(outputs, inputs, ctx) -> outputs`` on float tensors ``(N, 3, H, W)`` in ``[0, 1]``. Defenses
are registered in :data:`DEFENSE_REGISTRY` and built from config dicts such as
``{"name": "jpeg", "quality": 75}`` by :func:`build_defense`; :class:`DefensePipeline` runs an ordered
list of them and checks the contract (shape, dtype, range) after each one.

This package knows tensors and a request context, never HTTP.
"""

# Importing the built-in defenses registers them: the registry is complete after ``import defenses``.
from defenses import feature_amplify, fmd, jpeg, noise, poison  # noqa: F401
from defenses.base import (
    DefenseContext,
    DefenseParams,
    ModelAccessError,
    ModelHandle,
    OutputDefense,
    request_rng,
    request_seed,
)
from defenses.pipeline import DefensePipeline, DefenseTiming
from defenses.registry import (
    DEFENSE_REGISTRY,
    DefenseConfigError,
    build_defense,
    build_defenses,
    parse_defense_spec,
)
from defenses.watermark import ownership, trace  # noqa: F401

__all__ = [
    "DEFENSE_REGISTRY",
    "DefenseConfigError",
    "DefenseContext",
    "DefenseParams",
    "DefensePipeline",
    "DefenseTiming",
    "ModelAccessError",
    "ModelHandle",
    "OutputDefense",
    "build_defense",
    "build_defenses",
    "parse_defense_spec",
    "request_rng",
    "request_seed",
]
