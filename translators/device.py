"""Device selection: CUDA when present and not disabled, else CPU."""

from __future__ import annotations

import os

import torch


def pick_device(requested: str | None = None) -> torch.device:
    """``requested`` may be ``auto``/None, ``cpu``, ``cuda`` or ``cuda:N``; ``HEIST_DEVICE`` overrides auto."""
    choice = (requested or os.environ.get("HEIST_DEVICE") or "auto").lower()
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(choice)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {choice!r} requested but CUDA is not available on this machine")
    return dev
