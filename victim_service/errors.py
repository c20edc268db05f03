"""Errors the API answers with JSON ``{"error": CODE, "detail": SENTENCE}`` (docs/CONTRACTS.md)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import redis
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from translators.errors import HeistError, ImageError


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


@contextlib.contextmanager
def redis_unavailable(what: str) -> Iterator[None]:
    """Turn a Redis failure inside the block into :class:`BackendUnavailableError` (503) naming ``what``."""
    try:
        yield
    except (redis.RedisError, OSError) as exc:
        raise BackendUnavailableError(f"{what} (Redis) is unreachable: {type(exc).__name__}") from None


class OverloadedError(HeistError):
    """The model's queue is full; the API answers 503 ``overloaded`` with ``Retry-After: retry_after``."""

    code = "overloaded"

    def __init__(self, detail: str, retry_after: int = 1) -> None:
        super().__init__(detail)
        self.retry_after = max(1, int(retry_after))

def error_response(status: int, code: str, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """The JSON error response ``{"error": code, "detail": detail}``."""
    return JSONResponse({"error": code, "detail": detail}, status_code=status, headers=headers)


def error_parts(exc: BaseException) -> tuple[int, str, str, dict[str, str]]:
    """(status, code, detail, headers) of an exception raised while handling a request."""
    if isinstance(exc, ApiError):
        return exc.status, exc.code, exc.detail, exc.headers
    if isinstance(exc, ImageError):
        return exc.status, exc.code, str(exc), {}
    if isinstance(exc, BackendUnavailableError):
        return 503, "backend_unavailable", str(exc), {"Retry-After": "1"}
    if isinstance(exc, OverloadedError):
        return 503, "overloaded", str(exc), {"Retry-After": str(exc.retry_after)}
    if isinstance(exc, HeistError):
        return 400, exc.code, str(exc), {}
    return 500, "internal_error", "the server failed to handle this request; it has been logged", {}
