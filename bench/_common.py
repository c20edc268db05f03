"""Helpers shared by the bench scripts: argument checks, SIGTERM handling, stopping children, Redis clean-up.

Not a benchmark (``make bench`` runs a fixed list of scripts, see ``BENCH_QUICK`` in the Makefile). The
scripts import it as ``from _common import ...`` (``bench/`` is ``sys.path[0]`` when a script runs). It
imports only the standard library at module level, so ``bench/loadgen.py`` stays small.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import subprocess
from collections.abc import Callable, Iterable
from pathlib import Path
from types import FrameType

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


# --- signals and children -------------------------------------------------------------------------------------


def exit_on_sigterm() -> None:
    """Make SIGTERM (``timeout``, ``kill``, a CI runner) raise ``SystemExit(143)`` in the main thread, so every
    ``finally`` and ``with`` block runs as on Ctrl-C: servers and load generators are stopped, temporary folders
    removed. A second SIGTERM during that clean-up is ignored (the clean-up has its own time limits)."""
    fired = False

    def handler(signum: int, frame: FrameType | None) -> None:
        nonlocal fired
        if fired:
            return
        fired = True
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def stop_processes(procs: Iterable[subprocess.Popen], grace: float = 5.0) -> None:  # type: ignore[type-arg]
    """SIGTERM every process still running, wait up to ``grace`` seconds for each, SIGKILL what is left."""
    procs = list(procs)
    for p in procs:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                p.terminate()
    for p in procs:
        try:
            p.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                p.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=grace)


# --- Redis ----------------------------------------------------------------------------------------------------


def _glob_escape(s: str) -> str:
    return "".join("\\" + ch if ch in "*?[]\\" else ch for ch in s)


def delete_prefix(redis_url: str | None, prefix: str) -> int:
    """Delete every key that starts with ``prefix`` (SCAN + DEL; only that prefix). Returns how many were deleted;
    0 without ``redis_url``. Errors are not raised: this runs in ``finally`` blocks."""
    if not redis_url or not prefix:
        return 0
    try:
        import redis

        r = redis.Redis.from_url(redis_url, socket_connect_timeout=2, socket_timeout=10)
        n = 0
        batch: list[bytes] = []
        for key in r.scan_iter(match=_glob_escape(prefix) + "*", count=500):
            batch.append(key)
            if len(batch) >= 500:
                n += int(r.delete(*batch))
                batch.clear()
        if batch:
            n += int(r.delete(*batch))
        r.close()
        return n
    except Exception:  # noqa: BLE001 - best effort in a finally block; the benchmark's result matters more
        return 0


# --- argument types -------------------------------------------------------------------------------------------


def int_range(lo: int | None = None, hi: int | None = None) -> Callable[[str], int]:
    """An argparse ``type``: an integer in ``[lo, hi]`` (either bound optional)."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if lo is not None and v < lo:
            raise argparse.ArgumentTypeError(f"{v} is below the minimum {lo}")
        if hi is not None and v > hi:
            raise argparse.ArgumentTypeError(f"{v} is above the maximum {hi}")
        return v

    parse.__name__ = "integer"
    return parse


def float_range(lo: float | None = None, hi: float | None = None, *, strict_lo: bool = False) -> Callable[[str], float]:
    """An argparse ``type``: a finite float, ``>= lo`` (``> lo`` with ``strict_lo``) and ``<= hi``."""

    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if v != v or v in (float("inf"), float("-inf")):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        if lo is not None and (v <= lo if strict_lo else v < lo):
            raise argparse.ArgumentTypeError(f"{v:g} must be {'>' if strict_lo else '>='} {lo:g}")
        if hi is not None and v > hi:
            raise argparse.ArgumentTypeError(f"{v:g} is above the maximum {hi:g}")
        return v

    parse.__name__ = "number"
    return parse


def int_list(lo: int | None = None, hi: int | None = None) -> Callable[[str], list[int]]:
    """An argparse ``type``: comma-separated integers, each in ``[lo, hi]``, at least one."""
    one = int_range(lo, hi)

    def parse(text: str) -> list[int]:
        parts = [p.strip() for p in text.split(",") if p.strip()]
        if not parts:
            raise argparse.ArgumentTypeError("expected comma-separated integers, got nothing")
        return [one(p) for p in parts]

    parse.__name__ = "integer list"
    return parse


def device(text: str) -> str:
    """An argparse ``type``: ``cpu``, ``cuda``, ``cuda:N`` or ``mps``, checked against this machine (so a GPU
    run on a host without one, or a typo, fails at once instead of after minutes of set-up)."""
    import torch

    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device (cpu, cuda, cuda:N, mps)") from None
    if dev.type == "cpu":
        return text
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text!r}: no CUDA device on this machine (torch.cuda.is_available() "
                                             "is False)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        return text
    if dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise argparse.ArgumentTypeError(f"{text!r}: MPS is not available on this machine")
        return text
    raise argparse.ArgumentTypeError(f"{text!r}: unsupported device type {dev.type!r} (cpu, cuda, cuda:N, mps)")

