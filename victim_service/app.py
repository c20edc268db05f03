"""App factory: ``create_app(settings)`` builds a FastAPI app whose parts start in its lifespan.

Nothing is created at import time. uvicorn with several workers needs an import string, so
:func:`create_app_from_env` reads the settings path from ``HEIST_VICTIM_CONFIG``::

    HEIST_VICTIM_CONFIG=configs/victim.toml uvicorn --factory victim_service.app:create_app_from_env --workers 2

Every error leaves as JSON ``{"error": CODE, "detail": SENTENCE}`` (``victim_service.errors.ErrorBody``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match, Route

import translators
from translators.errors import HeistError
from victim_service.monitor_routes import router as monitor_router
from victim_service.routes import document_translate_refusals, error_parts, error_response, router
from victim_service.services import Services
from victim_service.settings import Settings, SettingsError, resolve_settings

log = logging.getLogger("heist.victim")

_HTTP_CODES = {
    400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
    406: "not_acceptable", 413: "too_many_bytes", 415: "unsupported_media_type", 422: "invalid_request",
    429: "rate_limited", 503: "unavailable",
}


def create_app(settings: Settings) -> FastAPI:
    """A FastAPI app serving ``settings``; models load and warm up in the lifespan (before the first request)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        svc = await Services.start(settings)
        app.state.svc = svc
        try:
            yield
        finally:
            await svc.close()

    app = FastAPI(
        title="Heist victim API",
        version=translators.__version__,
        description="Image-to-image translation behind API keys, rate limits and quotas. "
        "Errors are JSON `{error, detail}`.",
        lifespan=lifespan,
        docs_url="/docs" if settings.docs else None,
        redoc_url=None,
        openapi_url="/openapi.json" if settings.docs else None,
    )
    app.state.settings = settings
    app.include_router(router)
    base_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        """The schema, its translate route documenting what it refuses with this server's values (built on the
        first request, after the models loaded, so their per-model limits are listed too)."""
        if app.openapi_schema is None:
            svc = getattr(app.state, "svc", None)
            document_translate_refusals(base_openapi(), settings, list(svc.host.models.values()) if svc else [])
        return app.openapi_schema  # type: ignore[return-value]

    app.openapi = openapi  # type: ignore[method-assign]
    app.include_router(monitor_router)

    @app.exception_handler(HeistError)
    async def _heist_error(request: Request, exc: HeistError) -> JSONResponse:
        status, code, detail, headers = error_parts(exc)
        return error_response(status, code, detail, headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, "error")
        detail = exc.detail if isinstance(exc.detail, str) else "request failed"
        if exc.status_code == 404 and detail == "Not Found":
            detail = f"no route {request.method} {request.url.path}"
        headers = dict(exc.headers or {})
        if exc.status_code == 405:  # several routes may share a path (GET and POST .../level): list them all
            methods = {m for r in router.routes if isinstance(r, Route)
                       and r.matches(request.scope)[0] != Match.NONE for m in (r.methods or ())}
            if methods:
                headers["Allow"] = ", ".join(sorted(methods))
        return error_response(exc.status_code, code, detail, headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errs = exc.errors()
        first = errs[0] if errs else {"loc": (), "msg": "invalid request"}
        loc = ".".join(str(x) for x in first.get("loc", ()))
        return error_response(422, "invalid_request", f"{loc + ': ' if loc else ''}{first.get('msg', 'invalid')}")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal_error", "the server failed to handle this request; it has been logged")

    return app


def create_app_from_env() -> FastAPI:
    """The uvicorn factory: settings from the file named by ``HEIST_VICTIM_CONFIG`` (defaults if unset), found
    by :func:`~victim_service.settings.resolve_settings` like every ``heist`` command."""
    logging.basicConfig(level=os.environ.get("HEIST_VICTIM_LOG_LEVEL", "INFO").upper(),
                        format="%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s")
    try:
        settings = resolve_settings(None).settings
    except SettingsError as exc:
        log.error("%s", exc)
        raise SystemExit(2) from None
    return create_app(settings)
