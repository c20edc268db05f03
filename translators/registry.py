"""A tiny name -> class registry in the style of BasicSR.

Config keys are constructor kwargs: ``ARCH_REGISTRY.build("unet", {"depth": 4})`` calls
``UNetGenerator(depth=4)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any, Generic, TypeVar

from translators.errors import HeistError

T = TypeVar("T")


class UnknownNameError(HeistError, KeyError):
    """Raised when a registry is asked for a name it does not hold."""

    def __str__(self) -> str:  # KeyError quotes its message; we want a plain sentence.
        return str(self.args[0])


class Registry(Generic[T]):
    """Maps names to classes (or factories) that build ``T``."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, Callable[..., T]] = {}

    def register(self, name: str | None = None) -> Callable[[Callable[..., T]], Callable[..., T]]:
        """Decorator: ``@REGISTRY.register()`` uses the lower-cased class name, or ``name``."""

        def deco(obj: Callable[..., T]) -> Callable[..., T]:
            key = name or getattr(obj, "__name__", "").lower()
            if not key:
                raise ValueError(f"cannot register an unnamed {self.kind}")
            if key in self._items:
                raise ValueError(f"{self.kind} {key!r} is already registered")
            self._items[key] = obj
            return obj

        return deco

    def get(self, name: str) -> Callable[..., T]:
        try:
            return self._items[name]
        except KeyError:
            known = ", ".join(sorted(self._items)) or "none"
            raise UnknownNameError(f"unknown {self.kind} {name!r} (known: {known})") from None

    def build(self, name: str, kwargs: Mapping[str, Any] | None = None) -> T:
        """Instantiate ``name`` with ``kwargs``; a bad kwarg raises ``TypeError`` naming it."""
        factory = self.get(name)
        try:
            return factory(**dict(kwargs or {}))
        except TypeError as exc:
            raise TypeError(f"bad arguments for {self.kind} {name!r}: {exc}") from exc

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)
