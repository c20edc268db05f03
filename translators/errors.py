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
