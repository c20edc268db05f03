"""HTTP routes: translate, model list, health, metrics and the admin API."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from fastapi import APIRouter, Query, Request, Security
from fastapi.responses import JSONResponse, Response
from fastapi.security import APIKeyHeader, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, Field, field_validator

from victim_service.errors import (
    ApiError,
    ErrorBody,
    error_parts,
    error_response,
    redis_unavailable,
)
from victim_service.keys import open_key_store
from victim_service.levels import LevelError
from victim_service.models import ServedModel
from victim_service.querylog import LogReader, QueryLogEntry
from victim_service.services import Services
from victim_service.settings import NAME_CHARS, Settings, StoreInfo, check_name, is_name
from victim_service.translate import TranslateService, presented_key

__all__ = ["error_parts", "error_response", "presented_key", "router"]

log = logging.getLogger("heist.victim")
router = APIRouter()
api_key_scheme = APIKeyHeader(name="X-API-Key", auto_error=False, description="API key")
bearer_scheme = HTTPBearer(auto_error=False, description="the API key as a bearer token")

_BINARY = {"schema": {"type": "string", "format": "binary"}}
TRANSLATE_OPENAPI: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "The image: a raw body with an image Content-Type, or multipart field `image`. "
                       "A JPEG's EXIF orientation is applied when decoding (the photo is processed upright, "
                       "as browsers and phones display it); the output carries no EXIF.",
        "content": {
            "image/png": _BINARY,
            "image/jpeg": _BINARY,
            "image/webp": _BINARY,
            "application/octet-stream": _BINARY,
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["image"],
                    "properties": {"image": {"type": "string", "format": "binary"}},
                }
            },
        },
    }
}
_RL_HEADERS = {
    "X-Request-Id": {"schema": {"type": "string"}, "description": "id of this request in the query log"},
    "RateLimit-Limit": {"schema": {"type": "integer"}, "description": "burst size of the client's tier"},
    "RateLimit-Remaining": {"schema": {"type": "integer"}, "description": "requests that may follow at once"},
    "RateLimit-Reset": {"schema": {"type": "integer"}, "description": "seconds until the burst is full again"},
    "X-Quota-Remaining": {"schema": {"type": "integer"}, "description": "total quota left (when set)"},
}
_ERR = {"model": ErrorBody}
TRANSLATE_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The translated image (PNG unless Accept asks for JPEG or WebP).",
        "content": {"image/png": _BINARY, "image/jpeg": _BINARY, "image/webp": _BINARY},
        "headers": _RL_HEADERS,
    },
    400: {**_ERR, "description": "bad image: empty_body, not_an_image, corrupt_image, too_small, bad_size, "
                                 "bad_multipart"},
    401: {**_ERR, "description": "unauthorized: missing or invalid API key"},
    404: {**_ERR, "description": "unknown_model"},
    406: {**_ERR, "description": "not_acceptable: Accept allows none of PNG, JPEG, WebP"},
    413: {**_ERR, "description": "too_many_bytes or too_many_pixels (refused before decoding)"},
    415: {**_ERR, "description": "unsupported_media_type, unsupported_format or unsupported_mode"},
    429: {**_ERR, "description": "rate_limited or quota_exhausted; see Retry-After",
          "headers": {"Retry-After": {"schema": {"type": "integer"}, "description": "seconds to wait"}}},
    503: {**_ERR, "description": "overloaded or backend_unavailable; retry later"},
}

TRANSLATE_PATH = "/v1/models/{model}/translate"


def translate_refusals_markdown(settings: Settings, models: list[ServedModel]) -> str:
    """What the translate route refuses, with this server's values (Markdown for the OpenAPI description).

    The request-body schema can say "a PNG" but not "a PNG at least 8 pixels wide", so generated clients and
    fuzzers read the rules here: a schema-valid 1x1 PNG, or a GIF, is refused with a 4xx by design.
    """
    im = settings.images
    lines = [
        "**Refused inputs** (each a 4xx JSON error; a schema-valid body can still be refused):",
        "",
        "- formats: PNG, JPEG and WebP only, sent as `image/png`, `image/jpeg`, `image/webp`, "
        "`application/octet-stream` or the multipart field `image`. Another Content-Type (`image/gif`, ...): "
        "415 `unsupported_media_type`; GIF, BMP, TIFF or other bytes: 415 `unsupported_format`; damaged "
        "files: 400 `corrupt_image` / `not_an_image`; an empty body: 400 `empty_body`.",
        f"- body size: at most `max_bytes` bytes per model (default {im.max_bytes}): 413 `too_many_bytes`.",
        "- image size: width x height at most `max_pixels` (read from the header, before decoding): "
        "413 `too_many_pixels`; a shorter side under `min_side`: 400 `too_small` (a 1x1 image is refused by "
        "every model); sides not multiples of `size_multiple`, or not `fixed_size`: 400 `bad_size`.",
        f"- modes: alpha channel {'composited on white' if im.alpha == 'white' else 'refused (415)'}, "
        f"16-bit {'converted to 8 bits' if im.bit16 == 'convert' else 'refused (415)'}, animated images "
        f"{'use their first frame' if im.animated == 'first' else 'refused (415)'}; other modes such as "
        "CMYK or palette are converted to RGB.",
    ]
    if models:
        lines += ["", "This server's models (also `GET /v1/models`):", "",
                  "| model | min_side | size_multiple | fixed_size | max_pixels | max_bytes |",
                  "|---|---|---|---|---|---|"]
        for m in models:
            fixed = f"{m.fixed_size[1]}x{m.fixed_size[0]}" if m.fixed_size else "-"
            lines.append(f"| {m.name} | {m.min_side} | {m.size_multiple} | {fixed} | {m.max_pixels} | {m.max_bytes} |")
    return "\n".join(lines)


def document_translate_refusals(schema: dict[str, Any], settings: Settings, models: list[ServedModel]) -> None:
    """Append :func:`translate_refusals_markdown` to the translate operation of an OpenAPI ``schema`` (in place)."""
    op = schema.get("paths", {}).get(TRANSLATE_PATH, {}).get("post")
    if op is not None:
        op["description"] = f"{op.get('description', '').rstrip()}\n\n{translate_refusals_markdown(settings, models)}"


def svc_of(request: Request) -> Services:
    return request.app.state.svc  # type: ignore[no-any-return]


@router.post(
    TRANSLATE_PATH,
    summary="Translate one image",
    response_class=Response,
    responses=TRANSLATE_RESPONSES,
    openapi_extra=TRANSLATE_OPENAPI,
    dependencies=[Security(api_key_scheme), Security(bearer_scheme)],
    tags=["inference"],
)
async def translate(model: str, request: Request) -> Response:
    """Run the model on the posted image and return the result (PNG by default; JPEG/WebP by ``Accept``).

    Limits are checked in this order: API key (401), model (404), ``Accept`` (406), rate limit and quota
    (429; refused requests do not use quota), body size (413), media type (415), header-declared pixels
    (413, before decoding), decoding (400/415), model size rules (400), queue (503; also checked before the
    rate limit, so a request arriving behind a long queue is refused without using quota).

    The image is decoded as browsers and phones display it: a JPEG's EXIF orientation tag is applied
    (a photo stored sideways with "rotate 90" is turned upright) before the model sees it.
    """
    return await TranslateService(svc_of(request)).handle(model, request)


# ---------------------------------------------------------------------------------------------- model list


class ModelInfo(BaseModel):
    """What a client may know about a model: never its architecture or weights."""

    name: str
    task: str = Field(description="sr, denoise, style or translation")
    scale: int = Field(description="output side / input side")
    min_side: int = Field(description="smallest accepted input side, pixels")
    size_multiple: int = Field(description="input sides must be multiples of this")
    fixed_size: list[int] | None = Field(None, description="[height, width] when the model takes only one size")
    max_pixels: int = Field(description="largest accepted input width*height")
    max_bytes: int = Field(description="largest accepted request body, bytes")
    max_batch: int = Field(description="largest dynamic batch")
    max_batch_source: str = Field(description="'auto' (measured at warm-up), 'config', or 'fixed (export)' (a "
                                  "torch.export traced with one image)")
    output_formats: list[str] = Field(default_factory=lambda: ["image/png", "image/jpeg", "image/webp"])


def model_info(m: ServedModel) -> ModelInfo:
    return ModelInfo(
        name=m.name, task=m.task, scale=m.scale, min_side=m.min_side, size_multiple=m.size_multiple,
        fixed_size=list(m.fixed_size) if m.fixed_size else None, max_pixels=m.max_pixels, max_bytes=m.max_bytes,
        max_batch=m.max_batch, max_batch_source=m.max_batch_source,
    )


@router.get("/v1/models", response_model=list[ModelInfo], tags=["models"], summary="List served models")
async def list_models(request: Request) -> list[ModelInfo]:
    """Task, scale and input limits of every served model (no authentication needed)."""
    return [model_info(m) for m in svc_of(request).host.models.values()]


# ---------------------------------------------------------------------------------------------- health


class Health(BaseModel):
    status: str = Field(description="ok while the process answers")
    store: StoreInfo = Field(description="where this server keeps API keys, limits and quotas: `heist keys add` "
                             "compares it with its own settings and warns when they differ")


class Readiness(BaseModel):
    status: str = Field(description="ready or unavailable")
    models: list[str]
    redis: str = Field(description="ok, down or off")


@router.get("/healthz", response_model=Health, tags=["health"], summary="Liveness and the server's state store")
async def healthz(request: Request) -> Health:
    """Always 200 while the process runs; ``store`` names the Redis (URL without password, key prefix) or data
    directory this server reads its API keys from."""
    return Health(status="ok", store=svc_of(request).settings.store())


@router.get("/readyz", response_model=Readiness, tags=["health"], summary="Readiness",
            responses={503: {"model": Readiness, "description": "models not loaded or Redis down (fail-closed)"}})
async def readyz(request: Request) -> Response:
    """200 when every model is warm and, unless ``on_redis_error = "open"``, Redis answers."""
    svc = svc_of(request)
    ok = await svc.redis_ok()
    redis_state = "off" if ok is None else "ok" if ok else "down"
    ready = svc.ready and (ok is not False or svc.settings.on_redis_error == "open")
    body = Readiness(status="ready" if ready else "unavailable", models=list(svc.host.models), redis=redis_state)
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503)


@router.get("/metrics", tags=["health"], summary="Prometheus metrics", response_class=Response,
            responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}})
async def metrics(request: Request) -> Response:
    data = await asyncio.to_thread(svc_of(request).metrics.render)
    return Response(data, media_type=CONTENT_TYPE_LATEST)


# ---------------------------------------------------------------------------------------------- admin


def _require_admin(request: Request) -> Services:
    svc = svc_of(request)
    if svc.settings.admin_key is None:
        raise ApiError(403, "admin_disabled", "no admin_key is configured on this server")
    if not svc.keys.is_admin(presented_key(request)):
        raise ApiError(401, "unauthorized", "admin routes need the admin key")
    return svc


class KeyCreate(BaseModel):
    name: str = Field(json_schema_extra={"pattern": f"^{NAME_CHARS}$"})  # for the schema; checked below
    tier: str

    @field_validator("name")
    @classmethod
    def _client_name(cls, v: str) -> str:  # 422 with a sentence, not pydantic's "should match pattern ..."
        return check_name(v, "client name")


class KeyCreated(BaseModel):
    name: str
    tier: str
    key: str = Field(description="shown once; only its hash is stored")


_ADMIN_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {**_ERR, "description": "not the admin key"},
    403: {**_ERR, "description": "admin API disabled"},
    422: {**_ERR, "description": "invalid_request: a parameter is out of range"},
    503: {**_ERR, "description": "backend_unavailable: the query log or key store cannot be reached"},
}


_CLIENT_RESPONSES: dict[int | str, dict[str, Any]] = {
    **_ADMIN_RESPONSES, 400: {**_ERR, "description": "bad_client (not a client name)"}}


@router.get("/v1/admin/log", tags=["admin"], summary="Recent query-log entries",
            response_model=list[QueryLogEntry], responses=_CLIENT_RESPONSES,
            dependencies=[Security(api_key_scheme), Security(bearer_scheme)])
async def admin_log(
    request: Request,
    limit: int = Query(50, ge=1, le=10_000),
    client: str | None = Query(None, max_length=64),
) -> list[QueryLogEntry]:
    """The ``limit`` most recent entries (oldest first), optionally of one client.

    Waits (up to 10 s) until every entry submitted so far is written, so a request answered before this
    call is in the answer; a loaded server's writer can lag a request by more than a second."""
    svc = _require_admin(request)
    if client is not None:  # a name no key can have has no entries: say so instead of answering []
        check_client_name(client)
    await svc.log.flush(timeout=10.0)
    reader = LogReader(svc.settings)
    with redis_unavailable("the query log"):
        return await asyncio.to_thread(reader.tail, limit, client)


@router.get("/v1/admin/clients/{client}/log", tags=["admin"], summary="A client's recent queries",
            response_model=list[QueryLogEntry], responses=_CLIENT_RESPONSES,
            dependencies=[Security(api_key_scheme), Security(bearer_scheme)])
async def admin_client_log(request: Request, client: str, limit: int = Query(50, ge=1, le=10_000)) -> Any:
    return await admin_log(request, limit=limit, client=client)


@router.post("/v1/admin/keys/reload", tags=["admin"], summary="Forget cached key lookups",
             responses=_ADMIN_RESPONSES, dependencies=[Security(api_key_scheme), Security(bearer_scheme)])
async def admin_reload_keys(request: Request) -> dict[str, int]:
    """Drop cached key lookups: this worker's now, every other worker's within about a second."""
    svc = _require_admin(request)
    return {"dropped": await svc.keys.reload()}


@router.post("/v1/admin/keys", tags=["admin"], summary="Create an API key", response_model=KeyCreated,
             status_code=201, responses={**_ADMIN_RESPONSES, 400: {**_ERR, "description": "bad tier or name"}},
             dependencies=[Security(api_key_scheme), Security(bearer_scheme)])
async def admin_add_key(request: Request, body: KeyCreate) -> KeyCreated:
    svc = _require_admin(request)
    if body.tier not in svc.settings.tiers:
        known = ", ".join(svc.settings.tiers)
        raise ApiError(400, "unknown_tier", f"tier {body.tier!r} is not configured (tiers: {known})")
    store = open_key_store(svc.settings)
    key = await asyncio.to_thread(store.add, body.name, body.tier)
    return KeyCreated(name=body.name, tier=body.tier, key=key)


@router.delete("/v1/admin/clients/{name}/key", tags=["admin"], summary="Revoke a client's API key",
               responses={**_CLIENT_RESPONSES, 404: {**_ERR, "description": "no_key: the client has no key"}},
               dependencies=[Security(api_key_scheme), Security(bearer_scheme)])
async def admin_revoke_key(request: Request, name: str) -> dict[str, str]:
    """Delete the key of client ``name`` (as ``heist keys revoke NAME``): refused at once here, on every other
    worker within about a second. The client's log, level and quota counters are kept."""
    svc = _require_admin(request)
    check_client_name(name)
    store = open_key_store(svc.settings)
    if not await asyncio.to_thread(store.revoke, name):
        raise ApiError(404, "no_key", f"client {name!r} has no key")
    await svc.keys.reload()
    return {"revoked": name}


class LevelSet(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    level: int = Field(ge=0, description="0 = the tier's pipeline; higher levels add or strengthen defenses")
    reason: str = Field("", max_length=500, description="why (kept with the level)")


class LevelInfo(BaseModel):
    client: str
    level: int
    reason: str = ""
    source: str = Field("none", description="admin, monitor, or none (never set)")
    set_at: float = Field(0.0, description="Unix seconds; 0 when never set")
    max_level: int = Field(description="highest level configured on this server")




def check_client_name(name: str) -> None:
    """400 ``bad_client`` unless ``name`` could be a client (API key) name."""
    if not is_name(name):
        raise ApiError(400, "bad_client", f"{name!r} is not a client name (letters, digits, '.', '_', '-'; at most "
                                          "64)")


@router.get("/v1/admin/clients/{name}/level", tags=["admin"], summary="A client's escalation level",
            response_model=LevelInfo, responses=_CLIENT_RESPONSES,
            dependencies=[Security(api_key_scheme), Security(bearer_scheme)])
async def admin_get_level(request: Request, name: str) -> LevelInfo:
    """The level that chooses this client's defenses (0 when never set)."""
    svc = _require_admin(request)
    check_client_name(name)
    with redis_unavailable("the level store"):
        rec = await svc.levels.record(name)
    top = svc.host.policy.max_level
    if rec is None:
        return LevelInfo(client=name, level=0, max_level=top)
    return LevelInfo(client=name, level=rec.level, reason=rec.reason, source=rec.source, set_at=rec.set_at,
                     max_level=top)


@router.post("/v1/admin/clients/{name}/level", tags=["admin"], summary="Set a client's escalation level",
             response_model=LevelInfo,
             responses={**_ADMIN_RESPONSES,
                        400: {**_ERR, "description": "bad_level or bad_client (not a client name)"}},
             dependencies=[Security(api_key_scheme), Security(bearer_scheme)])
async def admin_set_level(request: Request, name: str, body: LevelSet) -> LevelInfo:
    """Set the level by hand; every worker applies it within its level cache time (about a second)."""
    svc = _require_admin(request)
    check_client_name(name)
    top = svc.host.policy.max_level
    if body.level > top:
        raise ApiError(400, "bad_level", f"level {body.level} is above the highest configured level ({top})")
    try:
        with redis_unavailable("the level store"):
            rec = await svc.levels.set(name, body.level, reason=body.reason, source="admin")
    except LevelError as exc:
        raise ApiError(400, "bad_level", str(exc)) from None
    log.info("admin set client %s to level %d (%s)", name, rec.level, body.reason or "no reason given")
    return LevelInfo(client=name, level=rec.level, reason=rec.reason, source=rec.source, set_at=rec.set_at,
                     max_level=top)
