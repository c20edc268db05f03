"""Errors the API answers with JSON ``{"error": CODE, "detail": SENTENCE}`` (docs/CONTRACTS.md)."""

from __future__ import annotations

from pydantic import BaseModel, Field

from translators.errors import HeistError


class ErrorBody(BaseModel):
    """Body of every error response."""

    error: str = Field(description="machine-readable code, e.g. rate_limited, too_many_pixels")
    detail: str = Field(description="one sentence for humans")


class ApiError(HeistError):
    """An error with an HTTP status and a code; extra response headers ride along (Retry-After, ...)."""

    def __init__(self, status: int, code: str, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.headers = headers or {}


class BackendUnavailableError(HeistError):
    """Redis (limiter, key store) cannot be reached; the API answers 503 ``backend_unavailable``."""

    code = "backend_unavailable"


class OverloadedError(HeistError):
    """The model's queue is full; the API answers 503 ``overloaded`` with ``Retry-After: retry_after``."""

    code = "overloaded"

    def __init__(self, detail: str, retry_after: int = 1) -> None:
        super().__init__(detail)
        self.retry_after = max(1, int(retry_after))
