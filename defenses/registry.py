"""The defense registry and builders from config dicts (``{"name": "jpeg", "quality": 75}``)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import ValidationError

from defenses.base import OutputDefense
from translators.errors import HeistError
from translators.registry import Registry, UnknownNameError

DEFENSE_REGISTRY: Registry[OutputDefense] = Registry("defense")


class DefenseConfigError(HeistError):
    """A defense spec naming an unknown defense or carrying invalid parameters."""

    code = "bad_defense"


def _register_builtins() -> None:
    # Importing the modules registers their classes (kept here so the registry has no import cycle).
    import defenses.jpeg
    import defenses.noise
    import defenses.watermark.ownership  # noqa: F401


def build_defense(spec: Mapping[str, Any]) -> OutputDefense:
    """Build one defense from ``{"name": NAME, **params}``; raises :class:`DefenseConfigError` with the reason."""
    _register_builtins()
    if not isinstance(spec, Mapping) or "name" not in spec:
        raise DefenseConfigError(f"a defense must be a table with a 'name' key, got {spec!r}")
    params = {k: v for k, v in spec.items() if k != "name"}
    name = str(spec["name"])
    try:
        cls = DEFENSE_REGISTRY.get(name)
    except UnknownNameError as exc:
        raise DefenseConfigError(str(exc)) from None
    try:
        return cls(**params)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(x) for x in first.get("loc", ()))
        raise DefenseConfigError(f"defense {name!r}: {loc + ': ' if loc else ''}{first['msg']}") from None


def build_defenses(specs: Iterable[Mapping[str, Any]]) -> list[OutputDefense]:
    """Build an ordered list of defenses (see :func:`build_defense`)."""
    return [build_defense(s) for s in specs]
