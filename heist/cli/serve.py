"""`heist serve` (being built)."""

from __future__ import annotations


def serve() -> None:
    """Serve translation models over HTTP."""
    raise NotImplementedError
