"""Errors a user can cause. The CLI prints them as one line; the API maps them to 4xx JSON."""

from __future__ import annotations


class HeistError(Exception):
    """Base class for user-facing errors: the message is the whole story, no traceback needed."""

    code: str = "error"


class ImageError(HeistError):
    """An image that cannot be decoded or breaks a limit. ``code`` names the case for API clients."""

    def __init__(self, code: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.code = code
        self.status = status


class CheckpointError(HeistError):
    """A model file that is missing, corrupt, pickled or otherwise unloadable."""

    code = "bad_checkpoint"


class CorpusError(HeistError):
    """An image folder that does not exist or holds no readable image."""

    code = "bad_corpus"


def first_problem(exc: Exception) -> str:
    """One line for a validation failure: for a pydantic ``ValidationError`` its first error as ``loc: msg``
    (``Value error, `` dropped) plus ``(and N more problem(s))``; for any other exception its first line.
    Every one-line CLI error about bad options or files uses this, never pydantic's multi-line text."""
    errors = getattr(exc, "errors", None)
    if not callable(errors):
        text = str(exc).strip()
        return text.splitlines()[0] if text else type(exc).__name__
    found = errors()
    first = found[0]
    loc = ".".join(str(x) for x in first.get("loc", ()))
    msg = str(first.get("msg", "")).removeprefix("Value error, ")
    more = f" (and {len(found) - 1} more problem(s))" if len(found) > 1 else ""
    return f"{loc + ': ' if loc else ''}{msg}{more}"
