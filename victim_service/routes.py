"""HTTP routes: translate, model list, health, metrics and the admin API."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import uuid
from typing import Any

import redis
from fastapi import APIRouter, Query, Request, Security
from fastapi.responses import JSONResponse, Response
from fastapi.security import APIKeyHeader, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, Field
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from defenses import DefenseContext, request_rng, request_seed
from defenses.monitor.embedding import embed_for_log
from translators.codecs import MEDIA_TYPES, decode_image, encode_image, probe_image
from translators.errors import HeistError, ImageError
from victim_service.batching import admit
from victim_service.errors import ApiError, BackendUnavailableError, ErrorBody, OverloadedError
from victim_service.keys import hash_key, open_key_store
from victim_service.models import ServedModel
from victim_service.negotiation import negotiate
from victim_service.phash import phash64
from victim_service.querylog import LogReader, QueryLogEntry
from victim_service.services import Services
from victim_service.settings import Settings, StoreInfo

log = logging.getLogger("heist.victim")
router = APIRouter()
api_key_scheme = APIKeyHeader(name="X-API-Key", auto_error=False, description="API key")
bearer_scheme = HTTPBearer(auto_error=False, description="the API key as a bearer token")

RAW_TYPES = {"image/png", "image/jpeg", "image/jpg", "image/webp", "application/octet-stream"}
MULTIPART_SLACK = 64 * 1024  # multipart framing allowed on top of max_bytes
OFFLOAD_PIXELS = 128 * 128  # decode/encode larger images on a thread, not on the event loop

_BINARY = {"schema": {"type": "string", "format": "binary"}}
TRANSLATE_OPENAPI: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "The image: a raw body with an image Content-Type, or multipart field `image`.",
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


def error_response(status: int, code: str, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
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


def presented_key(request: Request) -> str | None:
    """The key from ``X-API-Key`` or ``Authorization: Bearer KEY``."""
    key = request.headers.get("x-api-key")
    if key and key.strip():
        return key.strip()
    auth = request.headers.get("authorization", "")
    if auth[:7].lower() == "bearer " and auth[7:].strip():
        return auth[7:].strip()
    return None


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it passes ``limit`` bytes (Content-Length checked first)."""
    cl = request.headers.get("content-length", "")
    if cl.isdigit() and int(cl) > limit:
        raise ImageError("too_many_bytes", f"the body is {int(cl)} bytes; the limit is {limit}", 413)
    chunks: list[bytes] = []
    n = 0
    async for chunk in request.stream():
        n += len(chunk)
        if n > limit:
            raise ImageError("too_many_bytes", f"the body is over {limit} bytes", 413)
        chunks.append(chunk)
    return b"".join(chunks)


async def _image_bytes(request: Request, max_bytes: int) -> bytes:
    """The image of a raw-body or multipart request. Raises :class:`ImageError` (400/413/415)."""
    ctype = request.headers.get("content-type", "")
    main = ctype.split(";")[0].strip().lower()
    is_multipart = main == "multipart/form-data"
    body = await _read_body(request, max_bytes + (MULTIPART_SLACK if is_multipart else 0))
    if not body:
        raise ImageError("empty_body", "the request body is empty; send the image bytes")
    if main in RAW_TYPES:
        return body
    if not is_multipart:
        raise ImageError(
            "unsupported_media_type",
            f"Content-Type {main or '(none)'!r} is not accepted; send image/png, image/jpeg or image/webp "
            "bytes, or multipart/form-data with an 'image' field",
            415,
        )

    async def replay() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=2, max_fields=10)
    except (StarletteHTTPException, ValueError, AssertionError, KeyError) as exc:
        detail = getattr(exc, "detail", None) or str(exc) or "malformed multipart body"
        raise ImageError("bad_multipart", f"could not parse the multipart body: {detail}") from None
    try:
        part = form.get("image")
        if part is None:
            raise ImageError("bad_multipart", "the multipart body has no 'image' field")
        data = await part.read() if isinstance(part, UploadFile) else str(part).encode()
    finally:
        await form.close()
    if not data:
        raise ImageError("empty_body", "the 'image' field is empty")
    if len(data) > max_bytes:
        raise ImageError("too_many_bytes", f"image is {len(data)} bytes; the limit is {max_bytes}", 413)
    return data


def _decode(data: bytes, model: ServedModel, svc: Services) -> tuple[Any, str, str | None]:
    """Pixels, perceptual hash and (when the query monitor runs) its source descriptor, on one thread."""
    x = decode_image(data, model.image_limits(svc.settings.images))
    model.check_size(int(x.shape[-2]), int(x.shape[-1]))
    emb = embed_for_log(x) if svc.settings.monitor.enabled else None  # docs/monitor.md
    return x, phash64(x), emb


def _encode(t: Any, fmt: str, svc: Services) -> bytes:
    o = svc.settings.output
    quality = o.jpeg_quality if fmt == "jpeg" else o.webp_quality
    return encode_image(t, fmt, quality=quality, png_compress_level=o.png_compress_level)  # type: ignore[arg-type]


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
    """
    svc = svc_of(request)
    t0 = time.perf_counter()
    rid = uuid.uuid4().hex
    entry = QueryLogEntry(
        ts=time.time(), request_id=rid, status=500, code="internal_error", model=model,
        ip=request.client.host if request.client else None, content_type=request.headers.get("content-type"),
    )
    headers: dict[str, str] = {"X-Request-Id": rid}
    served: ServedModel | None = None
    try:
        key = presented_key(request)
        if key is None:
            raise ApiError(401, "unauthorized", "missing API key: send 'X-API-Key: KEY' or 'Authorization: Bearer KEY'")
        entry.key_id = hash_key(key)[:12]
        client = await svc.authenticate(key)
        if client is None:
            raise ApiError(401, "unauthorized", "invalid API key")
        tier = svc.settings.tiers.get(client.tier)
        if tier is None:
            raise ApiError(401, "unauthorized", f"this key's tier {client.tier!r} is no longer offered")
        entry.client, entry.tier = client.name, client.tier
        served = svc.host.models.get(model)
        if served is None:
            raise ApiError(404, "unknown_model", f"no model named {model!r}; GET /v1/models lists them")
        fmt = negotiate(request.headers.get("accept"))
        admit(served)  # queue-time admission first: refused behind a long queue, no quota or decode spent
        decision = await svc.decide(client, tier)
        headers.update(decision.headers())
        if not decision.allowed:
            svc.metrics.refusals.labels(client.tier, decision.quota or decision.reason).inc()
            await _hash_refused_body(request, served, entry)
            if decision.reason == "rate_limited":
                raise ApiError(429, "rate_limited", f"rate limit of tier {client.tier!r} reached; retry after "
                               f"{headers.get('Retry-After', '1')} s", headers)
            which = "daily" if decision.quota == "daily" else "total"
            raise ApiError(429, "quota_exhausted", f"the {which} query quota of this key is used up", headers)
        data = await _image_bytes(request, served.max_bytes)
        entry.bytes_in = len(data)
        digest = hashlib.sha256(data).hexdigest()
        entry.input_sha256 = digest
        fmt_in, w, h = probe_image(data, served.image_limits(svc.settings.images))
        entry.width, entry.height = w, h
        entry.image_path = svc.log.save_image(digest, data, fmt_in)
        if w * h > OFFLOAD_PIXELS and svc.codecs is not None:
            x, ph, emb = await svc.codecs.run(_decode, data, served, svc)
        else:
            x, ph, emb = _decode(data, served, svc)
        entry.phash, entry.embedding = ph, emb
        ctx = DefenseContext(
            client_id=client.name, request_id=rid, model=served.name, tier=client.tier,
            rng=request_rng(request_seed(svc.secret, rid)), input_sha256=digest, secret=svc.secret,
        )
        result = await svc.host.infer(served, x, ctx, svc.settings.request_timeout_s)
        if svc.codecs is not None and (w * h * served.scale**2 > OFFLOAD_PIXELS or fmt == "jpeg"):
            body = await svc.codecs.encode(result.output, fmt, served.device)
        else:
            body = _encode(result.output, fmt, svc)
        pipe = svc.host.pipeline(served.name, client.tier)
        entry.defenses = pipe.names
        entry.queue_ms = round(result.queue_s * 1000, 3)
        entry.batch_size = result.batch_size
        entry.bytes_out = len(body)
        entry.status, entry.code = 200, "ok"
        svc.metrics.queue_wait.labels(served.name).observe(result.queue_s)
        return Response(body, media_type=MEDIA_TYPES[fmt], headers=headers)
    except asyncio.CancelledError:
        entry.status, entry.code = 499, "client_closed"  # nginx's code for a client that hung up
        raise
    except Exception as exc:
        status, code, detail, extra = error_parts(exc)
        if status >= 500 and code == "internal_error":
            log.exception("translate %s failed (request %s)", model, rid)
        entry.status, entry.code = status, code
        return error_response(status, code, detail, {**headers, **extra})
    finally:
        elapsed = time.perf_counter() - t0
        entry.latency_ms = round(elapsed * 1000, 3)
        svc.log.submit(entry)
        label = served.name if served is not None else "unknown"
        svc.metrics.requests.labels(label, str(entry.status), entry.tier or "none").inc()
        svc.metrics.latency.labels(label).observe(elapsed)


async def _hash_refused_body(request: Request, served: ServedModel, entry: QueryLogEntry) -> None:
    """For the log: SHA-256 and size of a refused request's body (read up to the model's byte limit)."""
    try:
        data = await _read_body(request, served.max_bytes + MULTIPART_SLACK)
    except (ImageError, OSError, RuntimeError):
        return
    entry.bytes_in = len(data)
    if data:
        entry.input_sha256 = hashlib.sha256(data).hexdigest()


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
    max_batch_source: str = Field(description="'auto' (measured at warm-up) or 'config'")
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
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    tier: str


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


@router.get("/v1/admin/log", tags=["admin"], summary="Recent query-log entries",
            response_model=list[QueryLogEntry], responses=_ADMIN_RESPONSES,
            dependencies=[Security(api_key_scheme), Security(bearer_scheme)])
async def admin_log(
    request: Request,
    limit: int = Query(50, ge=1, le=10_000),
    client: str | None = Query(None, max_length=64),
) -> list[QueryLogEntry]:
    """The ``limit`` most recent entries (oldest first), optionally of one client."""
    svc = _require_admin(request)
    await svc.log.flush(timeout=2.0)
    reader = LogReader(svc.settings)
    try:
        return await asyncio.to_thread(reader.tail, limit, client)
    except (redis.RedisError, OSError) as exc:
        raise BackendUnavailableError(f"the query log cannot be read: {type(exc).__name__}") from None


@router.get("/v1/admin/clients/{client}/log", tags=["admin"], summary="A client's recent queries",
            response_model=list[QueryLogEntry], responses=_ADMIN_RESPONSES,
            dependencies=[Security(api_key_scheme), Security(bearer_scheme)])
async def admin_client_log(request: Request, client: str, limit: int = Query(50, ge=1, le=10_000)) -> Any:
    return await admin_log(request, limit=limit, client=client)


@router.post("/v1/admin/keys/reload", tags=["admin"], summary="Forget cached key lookups",
             responses=_ADMIN_RESPONSES, dependencies=[Security(api_key_scheme), Security(bearer_scheme)])
async def admin_reload_keys(request: Request) -> dict[str, int]:
    """Drop this worker's cached key lookups so revoked keys stop working now (each worker caches separately)."""
    svc = _require_admin(request)
    return {"dropped": svc.keys.reload()}


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
