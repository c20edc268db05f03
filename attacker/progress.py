"""Progress reporting without a UI dependency: library code calls a :class:`ProgressHook`.

The CLI passes a hook that drives a rich progress bar (``heist/cli/attack.py``); Python callers may pass
their own or nothing (:data:`NO_PROGRESS`).
"""

from __future__ import annotations

from typing import Protocol


class ProgressHook(Protocol):
    def start(self, task: str, total: int | None, done: int = 0) -> None:
        """A task (``harvest``, ``train``) begins; ``total`` units, ``done`` of them already finished."""

    def advance(self, task: str, n: int = 1, info: str = "") -> None:
        """``n`` more units finished; ``info`` is a short status line (rate, 429s, loss)."""

    def finish(self, task: str) -> None:
        """The task ended (completed or stopped)."""


class _NoProgress:
    def start(self, task: str, total: int | None, done: int = 0) -> None:
        pass

    def advance(self, task: str, n: int = 1, info: str = "") -> None:
        pass

    def finish(self, task: str) -> None:
        pass


NO_PROGRESS: ProgressHook = _NoProgress()
