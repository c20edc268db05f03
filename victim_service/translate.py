"""The translate transaction as one object: auth -> limit -> read -> decode -> infer+defend -> encode -> log.

:class:`TranslateService` is what ``POST /v1/models/{model}/translate`` calls. Each request gets one
:class:`QueryLogEntry`, opened when the request arrives and submitted to the query log exactly once when
it ends (success, error or client hang-up: :meth:`TranslateService._logged`). The defenses recorded in
the entry are the ones the batcher reports as applied (:attr:`JobResult.defenses`), never recomputed.

Codec work is two plain functions, :func:`decode_request_image` and :func:`encode_response_image`, run
in one place, :meth:`TranslateService._codec`: on the event loop for small images, else on the service's
codec pool (``svc.codecs``, :mod:`victim_service.codecpool`), which also encodes JPEG answers of a CUDA
model with nvJPEG. Queue-time admission (:func:`victim_service.batching.admit`) runs before the rate
limiter, so a request that would wait behind a long queue is refused (503 + Retry-After) without quota.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from fastapi import Request
from fastapi.responses import Response
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from defenses import DefenseContext, request_rng, request_seed
from defenses.monitor.embedding import embed_for_log
from defenses.monitor.regions import regions_for_log
from translators.codecs import MEDIA_TYPES, ImageFormat, check_dimensions, decode_image, encode_image, probe_header
from translators.errors import ImageError
from victim_service.batching import admit
from victim_service.errors import ApiError, error_parts, error_response
from victim_service.keys import Client, hash_key
from victim_service.models import ServedModel
from victim_service.negotiation import negotiate
from victim_service.phash import phash64
from victim_service.querylog import QueryLogEntry
from victim_service.settings import Settings, TierSpec

if TYPE_CHECKING:
    from victim_service.services import Services

log = logging.getLogger("heist.victim")
OFFLOAD_PIXELS = 128 * 128  # decode/encode larger images on a thread, not on the event loop
T = TypeVar("T")


RAW_TYPES = {"image/png", "image/jpeg", "image/jpg", "image/webp", "application/octet-stream"}
MULTIPART_SLACK = 64 * 1024  # multipart framing allowed on top of max_bytes


def presented_key(request: Request) -> str | None:
    """The key from ``X-API-Key`` or ``Authorization: Bearer KEY``."""
    key = request.headers.get("x-api-key")
    if key and key.strip():
        return key.strip()
    auth = request.headers.get("authorization", "")
    if auth[:7].lower() == "bearer " and auth[7:].strip():
        return auth[7:].strip()
    return None


async def read_body(request: Request, max_bytes: int, slack: int = 0, idle_timeout_s: float | None = None) -> bytes:
    """The request body, refused with 413 as soon as it passes ``max_bytes + slack`` bytes (Content-Length
    checked first). ``slack`` is room for multipart framing; the error names ``max_bytes``, the configured limit.
    ``idle_timeout_s``: a body that sends no bytes for this long is refused with 408 ``body_timeout`` (a client
    that declares a length and stalls would otherwise hold its connection open for ever).
    Raises :class:`starlette.requests.ClientDisconnect` when the client hangs up mid-body."""
    limit = max_bytes + slack
    cl = request.headers.get("content-length", "")
    if cl.isdigit() and int(cl) > limit:
        raise ImageError("too_many_bytes", f"the body is {int(cl)} bytes; the limit is {max_bytes}", 413)
    chunks: list[bytes] = []
    n = 0
    stream = request.stream().__aiter__()
    while True:
        try:
            async with asyncio.timeout(idle_timeout_s):  # no task per chunk (wait_for would make one)
                chunk = await anext(stream)
        except StopAsyncIteration:
            break
        except TimeoutError:
            raise ImageError("body_timeout", f"no bytes of the request body arrived for {idle_timeout_s:g} s after "
                             f"{n} bytes; send the whole body at once", 408) from None
        n += len(chunk)
        if n > limit:
            raise ImageError("too_many_bytes", f"the body is over {max_bytes} bytes; the limit is {max_bytes}", 413)
        chunks.append(chunk)
    return b"".join(chunks)


async def _multipart_image(request: Request, body: bytes) -> bytes:
    """The one ``image`` part of a multipart body. Raises :class:`ImageError` ``bad_multipart``."""

    async def replay() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=2, max_fields=10)
    except (StarletteHTTPException, ValueError, AssertionError, KeyError) as exc:
        detail = getattr(exc, "detail", None) or str(exc) or "malformed multipart body"
        raise ImageError("bad_multipart", f"could not parse the multipart body: {detail}") from None
    try:
        parts = form.getlist("image")
        if not parts:
            raise ImageError("bad_multipart", "the multipart body has no 'image' field")
        if len(parts) > 1:
            raise ImageError("bad_multipart", f"the multipart body has {len(parts)} 'image' parts; send one image part")
        part = parts[0]
        return await part.read() if isinstance(part, UploadFile) else str(part).encode()
    finally:
        await form.close()


async def image_bytes(request: Request, max_bytes: int, idle_timeout_s: float | None = None) -> bytes:
    """The image of a raw-body or multipart request. Raises :class:`ImageError` (400/408/413/415)."""
    ctype = request.headers.get("content-type", "")
    main = ctype.split(";")[0].strip().lower()
    is_multipart = main == "multipart/form-data"
    body = await read_body(request, max_bytes, MULTIPART_SLACK if is_multipart else 0, idle_timeout_s)
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
    data = await _multipart_image(request, body)
    if not data:
        raise ImageError("empty_body", "the 'image' field is empty")
    if len(data) > max_bytes:
        raise ImageError("too_many_bytes", f"image is {len(data)} bytes; the limit is {max_bytes}", 413)
    return data


REFUSED_BODY_WAIT_S = 5.0  # a refused request's body is hashed for the log only if it keeps coming


async def hash_refused_body(request: Request, served: ServedModel, entry: QueryLogEntry) -> None:
    """For the log: SHA-256 and size of a refused request's body (read up to the model's byte limit)."""
    try:
        data = await read_body(request, served.max_bytes, MULTIPART_SLACK, REFUSED_BODY_WAIT_S)
    except (ImageError, OSError, RuntimeError, ClientDisconnect):
        return
    entry.bytes_in = len(data)
    if data:
        entry.input_sha256 = hashlib.sha256(data).hexdigest()


def decode_request_image(
    data: bytes, model: ServedModel, settings: Settings
) -> tuple[torch.Tensor, str, str | None, str | None]:
    """Request bytes -> ``(1, 3, H, W)`` in [0, 1] (EXIF orientation applied), its 64-bit pHash (hex) and,
    when the query monitor runs, its crop-tolerant source descriptor and its shared-region fingerprint
    (docs/monitor.md).

    Raises :class:`translators.errors.ImageError` for bad images and images the model cannot take.
    """
    x = decode_image(data, model.image_limits(settings.images))
    model.check_size(int(x.shape[-2]), int(x.shape[-1]))
    if not settings.monitor.enabled:
        return x, phash64(x), None, None
    return x, phash64(x), embed_for_log(x), regions_for_log(x)


def encode_response_image(t: torch.Tensor, fmt: ImageFormat, settings: Settings) -> bytes:
    """``(1, 3, H, W)`` in [0, 1] -> response bytes in ``fmt`` at the configured quality (Pillow)."""
    o = settings.output
    quality = o.jpeg_quality if fmt == "jpeg" else o.webp_quality
    return encode_image(t, fmt, quality=quality, png_compress_level=o.png_compress_level)


SHUTDOWN_CANCEL = "graceful shutdown"
"""In the message uvicorn cancels still-running requests with when its graceful shutdown times out."""


class TranslateService:
    """Handles translate requests for one app instance (holds no per-request state)."""

    def __init__(self, svc: Services) -> None:
        self.svc = svc

    async def handle(self, model: str, request: Request) -> Response:
        """The whole transaction for one request; errors become JSON responses (see ``routes.error_parts``)."""
        rid = uuid.uuid4().hex
        headers: dict[str, str] = {"X-Request-Id": rid}
        async with self._logged(rid, model, request) as entry:
            try:
                return await self._run(model, request, rid, entry, headers)
            except asyncio.CancelledError as exc:
                if SHUTDOWN_CANCEL in (str(exc.args[0]) if exc.args else ""):
                    # uvicorn's graceful shutdown ran out of time: the client is still there, so answer it
                    # (uvicorn would send a bare text/plain 500) and log what it got, not a hang-up.
                    entry.status, entry.code = 503, "shutting_down"
                    return error_response(503, "shutting_down", "the server is shutting down; retry shortly",
                                          {**headers, "Retry-After": "1"})
                entry.status, entry.code = 499, "client_closed"  # nginx's code for a client that hung up
                raise
            except ClientDisconnect:  # hung up mid-body (or sent less than its Content-Length): nobody to answer
                entry.status, entry.code = 499, "client_closed"
                return error_response(499, "client_closed", "the client closed the connection", headers)
            except Exception as exc:
                status, code, detail, extra = error_parts(exc)
                if status >= 500 and code == "internal_error":
                    log.exception("translate %s failed (request %s)", model, rid)
                entry.status, entry.code = status, code
                return error_response(status, code, detail, {**headers, **extra})
        raise AssertionError("unreachable")  # pragma: no cover - the context manager never swallows

    @contextlib.asynccontextmanager
    async def _logged(self, rid: str, model: str, request: Request) -> AsyncIterator[QueryLogEntry]:
        """One log entry per request, submitted once when the request ends, with latency and metrics."""
        svc = self.svc
        t0 = time.perf_counter()
        entry = QueryLogEntry(
            ts=time.time(), request_id=rid, status=500, code="internal_error", model=model,
            ip=request.client.host if request.client else None, content_type=request.headers.get("content-type"),
        )
        try:
            yield entry
        finally:
            elapsed = time.perf_counter() - t0
            entry.latency_ms = round(elapsed * 1000, 3)
            svc.log.submit(entry)
            label = model if model in svc.host.models else "unknown"
            svc.metrics.requests.labels(label, str(entry.status), entry.tier or "none").inc()
            svc.metrics.latency.labels(label).observe(elapsed)

    async def _run(
        self, model: str, request: Request, rid: str, entry: QueryLogEntry, headers: dict[str, str]
    ) -> Response:
        svc = self.svc
        client, tier = await self._authenticate(request, entry)
        served = svc.host.models.get(model)
        if served is None:
            raise ApiError(404, "unknown_model", f"no model named {model!r}; GET /v1/models lists them")
        fmt = negotiate(request.headers.get("accept"))
        admit(served)  # queue-time admission first: refused behind a long queue, no quota or decode spent
        await self._limit(request, client, tier, served, entry, headers)
        data = await self._read(request, served, entry)
        # small inputs decode on the loop (their fingerprints cost about 1-3 ms): a burst then reaches the queue one
        # request at a time, which the queue-time admission check relies on
        x, ph, emb, regions = await self._codec(
            (entry.width or 0) * (entry.height or 0), decode_request_image, data, served, svc.settings
        )
        entry.phash, entry.embedding, entry.regions = ph, emb, regions
        resolved = await svc.host.policy.for_client(served.name, client, svc.levels)
        entry.level = resolved.level
        ctx = DefenseContext(
            client_id=client.name, request_id=rid, model=served.name, tier=client.tier,
            rng=request_rng(request_seed(svc.secret, rid)), input_sha256=entry.input_sha256 or "",
            secret=svc.secret, level=resolved.level,
        )
        result = await svc.host.infer(served, x, ctx, svc.settings.request_timeout_s, resolved.pipeline)
        entry.defenses = list(result.defenses)
        out_pixels = (entry.width or 0) * (entry.height or 0) * served.scale**2
        body = await self._encode(result.output, fmt, served, out_pixels)
        entry.queue_ms = round(result.queue_s * 1000, 3)
        entry.batch_size = result.batch_size
        entry.bytes_out = len(body)
        entry.status, entry.code = 200, "ok"
        svc.metrics.queue_wait.labels(served.name).observe(result.queue_s)
        return Response(body, media_type=MEDIA_TYPES[fmt], headers=headers)

    async def _authenticate(self, request: Request, entry: QueryLogEntry) -> tuple[Client, TierSpec]:
        key = presented_key(request)
        if key is None:
            raise ApiError(401, "unauthorized", "missing API key: send 'X-API-Key: KEY' or 'Authorization: Bearer KEY'")
        entry.key_id = hash_key(key)[:12]
        client = await self.svc.authenticate(key)
        if client is None:
            raise ApiError(401, "unauthorized", "invalid API key")
        tier = self.svc.settings.tiers.get(client.tier)
        if tier is None:
            raise ApiError(401, "unauthorized", f"this key's tier {client.tier!r} is no longer offered")
        entry.client, entry.tier = client.name, client.tier
        return client, tier

    async def _limit(
        self, request: Request, client: Client, tier: TierSpec, served: ServedModel, entry: QueryLogEntry,
        headers: dict[str, str],
    ) -> None:
        decision = await self.svc.decide(client, tier)
        headers.update(decision.headers())
        if decision.allowed:
            return
        self.svc.metrics.refusals.labels(client.tier, decision.quota or decision.reason).inc()
        await hash_refused_body(request, served, entry)
        if decision.reason == "rate_limited":
            raise ApiError(429, "rate_limited", f"rate limit of tier {client.tier!r} reached; retry after "
                           f"{headers.get('Retry-After', '1')} s", headers)
        which = "daily" if decision.quota == "daily" else "total"
        raise ApiError(429, "quota_exhausted", f"the {which} query quota of this key is used up", headers)

    async def _read(self, request: Request, served: ServedModel, entry: QueryLogEntry) -> bytes:
        svc = self.svc
        data = await image_bytes(request, served.max_bytes, svc.settings.body_timeout_s)
        entry.bytes_in = len(data)
        digest = hashlib.sha256(data).hexdigest()
        entry.input_sha256 = digest
        limits = served.image_limits(svc.settings.images)
        fmt_in, w, h = probe_header(data, limits)
        entry.width, entry.height = w, h  # upright, and logged even when the size limits refuse the image
        check_dimensions(w, h, limits)
        entry.image_path = svc.log.save_image(digest, data, fmt_in)
        return data

    async def _codec(self, pixels: int, fn: Callable[..., T], *args: Any) -> T:
        """Run a codec call on the codec pool when the image has more than ``OFFLOAD_PIXELS`` pixels."""
        if pixels <= OFFLOAD_PIXELS:
            return fn(*args)
        if self.svc.codecs is not None:
            return await self.svc.codecs.run(fn, *args)
        return await asyncio.to_thread(fn, *args)

    async def _encode(self, t: torch.Tensor, fmt: ImageFormat, served: ServedModel, pixels: int) -> bytes:
        """The response body: on the codec pool (nvJPEG for JPEG on CUDA) for large or JPEG outputs."""
        codecs = self.svc.codecs
        if codecs is not None and (pixels > OFFLOAD_PIXELS or fmt == "jpeg"):
            return await codecs.encode(t, fmt, served.device)
        return await self._codec(pixels, encode_response_image, t, fmt, self.svc.settings)
