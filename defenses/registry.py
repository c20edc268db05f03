"""The defense registry and builders from config dicts (``{"name": "jpeg", "quality": 75}``).

The registry is complete once the ``defenses`` package is imported: ``defenses/__init__.py`` imports every
built-in defense module (each registers its class), and this module imports none of them (no cycle).
"""

from __future__ import annotations

import typing
from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import ValidationError

from defenses.base import OutputDefense
from translators.errors import HeistError, first_problem
from translators.registry import Registry, UnknownNameError

DEFENSE_REGISTRY: Registry[OutputDefense] = Registry("defense")


class DefenseConfigError(HeistError):
    """A defense spec naming an unknown defense or carrying invalid parameters."""

    code = "bad_defense"


def build_defense(spec: Mapping[str, Any]) -> OutputDefense:
    """Build one defense from ``{"name": NAME, **params}``; raises :class:`DefenseConfigError` with the reason."""
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
        valid = ", ".join(cls.Params.model_fields) or "none"
        raise DefenseConfigError(f"defense {name!r}: {first_problem(exc)} (valid parameters: {valid})") from None


def build_defenses(specs: Iterable[Mapping[str, Any]]) -> list[OutputDefense]:
    """Build an ordered list of defenses (see :func:`build_defense`)."""
    return [build_defense(s) for s in specs]


def _takes_text(cls: type[OutputDefense], key: str) -> bool:
    """Whether parameter ``key`` of ``cls`` is a text field (``str`` or ``str | None``): its value stays text,
    so that ``key_id=42`` or ``layer=3`` mean the strings "42" and "3"."""
    field = cls.Params.model_fields.get(key)
    if field is None:
        return False
    ann = field.annotation
    return ann is str or (str in typing.get_args(ann) and not {int, float, bool} & set(typing.get_args(ann)))


def _parse_value(text: str) -> Any:
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text.strip()


def parse_defense_spec(text: str) -> dict[str, Any]:
    """``"name"`` or ``"name:key=value,key=value"`` -> a validated spec dict (values read as int, float, bool
    or str). Raises :class:`DefenseConfigError` naming the valid defenses or parameters."""
    name, _, rest = text.partition(":")
    name = name.strip()
    if not name:
        raise DefenseConfigError(f"defense spec {text!r} has no name; write NAME or NAME:key=value,...")
    try:
        cls = DEFENSE_REGISTRY.get(name)
    except UnknownNameError as exc:
        raise DefenseConfigError(str(exc)) from None
    spec: dict[str, Any] = {"name": name}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise DefenseConfigError(f"defense spec {text!r}: {item!r} is not key=value")
        if key in spec:
            raise DefenseConfigError(f"defense spec {text!r}: {key!r} is given twice")
        spec[key] = value.strip() if _takes_text(cls, key) else _parse_value(value)
    build_defense(spec)
    return spec
