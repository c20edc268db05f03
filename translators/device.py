"""Device selection: CUDA when present and not disabled, else CPU."""

from __future__ import annotations

import os

import torch

from translators.errors import HeistError


class DeviceError(HeistError, RuntimeError):
    """A device that does not exist here (a one-line CLI error; still a ``RuntimeError`` for old callers)."""

    code = "bad_device"


def pick_device(requested: str | None = None) -> torch.device:
    """``requested`` may be ``auto``/None, ``cpu``, ``cuda`` or ``cuda:N``; ``HEIST_DEVICE`` overrides auto.
    Raises :class:`DeviceError` for an unknown device or CUDA on a machine without it."""
    choice = (requested or os.environ.get("HEIST_DEVICE") or "auto").lower()
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(choice)
    except RuntimeError:
        raise DeviceError(f"device {choice!r}: use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device {choice!r} requested but CUDA is not available on this machine")
    return dev


def default_threads() -> int:
    """Torch intra-op threads Heist uses on the CPU: ``$HEIST_TORCH_THREADS``, else half the cores (at least 1).

    Half, because a campaign runs the victim server and the attacker's training side by side, and
    oversubscribed OpenMP threads spin: on 2 shared cores, 2 threads trained 15x slower than 1.
    """
    env = os.environ.get("HEIST_TORCH_THREADS")
    if env:
        try:
            return max(1, int(env))
        except ValueError:
            raise ValueError(f"HEIST_TORCH_THREADS must be an integer, got {env!r}") from None
    return max(1, (os.cpu_count() or 2) // 2)


def configure_threads(threads: int | None = None) -> int:
    """Set torch's intra-op thread count (entry points call this once); returns the value set."""
    n = threads or default_threads()
    torch.set_num_threads(n)
    return n
