"""HTTP client for the victim API (``docs/CONTRACTS.md``, Victim HTTP API). Async, httpx.

:class:`VictimClient` does single requests and reports what happened (:class:`Outcome`); pacing,
retries and policies live in :mod:`attacker.pacing` and :mod:`attacker.harvest`. The attacker only
knows the URL, its key(s), the model name and ``GET /v1/models``.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from attacker.errors import ConfigError, UnknownModelError, VictimFailingError, VictimUnreachableError
from attacker.pacing import RateHeaders
from attacker.victim_info import ModelInfo


class ClientConfig(BaseModel):
    """Network behaviour of the attacker.

    Attributes:
        max_concurrency: requests in flight per API key at most (the pacer may use fewer).
        connect_timeout_s / read_timeout_s: per request.
        max_retries: attempts after the first for one query on 5xx, timeouts and transport errors.
        backoff_base_s / backoff_max_s: full-jitter exponential backoff, ``U(0, min(max, base * 2**n))``.
        storm_limit: consecutive failed requests (5xx/transport) with no success in between that stop
            the run (a 5xx storm or a dead server).
        accept: media type asked for; PNG keeps outputs lossless.
    """

    model_config = ConfigDict(extra="forbid")

    max_concurrency: int = Field(8, ge=1, le=256)
    connect_timeout_s: float = Field(5.0, gt=0)
    read_timeout_s: float = Field(120.0, gt=0)
    max_retries: int = Field(6, ge=0)
    backoff_base_s: float = Field(0.25, gt=0)
    backoff_max_s: float = Field(15.0, gt=0)
    storm_limit: int = Field(30, ge=1)
    accept: str = "image/png"


@dataclass
class Outcome:
    """What one request produced. ``status`` None means no HTTP answer (``error`` says why)."""

    status: int | None
    code: str | None = None
    detail: str = ""
    headers: RateHeaders = field(default_factory=RateHeaders)
    body: bytes = b""
    content_type: str = ""
    request_id: str | None = None
    latency_s: float = 0.0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


def check_url(url: str) -> str:
    """``url`` without trailing slashes; raises :class:`ConfigError` (one line) unless it is a valid http(s) URL
    with a host."""
    u = url.strip().rstrip("/")
    if not u.startswith(("http://", "https://")):
        raise ConfigError(f"--url must start with http:// or https:// (got {url!r})")
    try:
        host = httpx.URL(u).host
    except (httpx.InvalidURL, ValueError) as exc:
        raise ConfigError(f"--url {url!r} is not a valid URL ({one_line(str(exc))})") from None
    if not host:
        raise ConfigError(f"--url {url!r} names no host")
    return u


def one_line(text: str, limit: int = 200) -> str:
    """``text`` with every run of whitespace (newlines included) collapsed to one space, cut to ``limit`` chars."""
    s = " ".join(text.split())
    return s if len(s) <= limit else s[: limit - 1] + "…"


def _error_fields(resp: httpx.Response) -> tuple[str | None, str]:
    try:
        data: Any = json.loads(resp.content)
    except (ValueError, UnicodeDecodeError):
        return None, one_line(resp.text)
    if isinstance(data, dict):
        code = data.get("error")
        return (str(code) if code is not None else None), one_line(str(data.get("detail", "")), 500)
    return None, one_line(str(data))


def describe_transport_error(exc: BaseException) -> str:
    if isinstance(exc, httpx.ConnectError):
        return f"connection failed ({exc or 'refused'})"
    if isinstance(exc, httpx.TimeoutException):
        return f"timed out ({type(exc).__name__})"
    return f"{type(exc).__name__}: {exc}"


class VictimClient:
    """One ``httpx.AsyncClient`` to the victim. Use as ``async with VictimClient(url, cfg) as c``."""

    def __init__(self, url: str, config: ClientConfig | None = None, connections: int | None = None) -> None:
        self.url = check_url(url)
        self.config = config or ClientConfig()
        self._connections = connections or self.config.max_concurrency
        self._http: httpx.AsyncClient | None = None

    async def __aenter__(self) -> VictimClient:
        c = self.config
        self._http = httpx.AsyncClient(
            base_url=self.url,
            timeout=httpx.Timeout(c.read_timeout_s, connect=c.connect_timeout_s),
            limits=httpx.Limits(max_connections=self._connections + 2, max_keepalive_connections=self._connections + 2),
            headers={"User-Agent": "heist-attacker/0.1"},
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    @property
    def http(self) -> httpx.AsyncClient:
        if self._http is None:
            raise RuntimeError("VictimClient used outside `async with`")
        return self._http

    async def models(self, tries: int = 3) -> list[ModelInfo]:
        """``GET /v1/models``. Raises :class:`VictimUnreachableError` / :class:`VictimFailingError`."""
        last = ""
        for attempt in range(tries):
            try:
                resp = await self.http.get("/v1/models")
            except httpx.HTTPError as exc:
                last = describe_transport_error(exc)
                if attempt + 1 < tries:
                    await asyncio.sleep(0.5 * 2**attempt)
                continue
            if resp.status_code >= 500:
                last = f"HTTP {resp.status_code}"
                if attempt + 1 < tries:
                    await asyncio.sleep(0.5 * 2**attempt)
                continue
            if resp.status_code != 200:
                code, detail = _error_fields(resp)
                hint = "" if code else "; is this a Heist victim API?"
                msg = " ".join(f"{self.url}/v1/models answered HTTP {resp.status_code} {code or ''} {detail}".split())
                raise VictimFailingError(msg + hint)
            try:
                data = resp.json()
                if not isinstance(data, list):
                    raise ValueError("not a list")
                return [ModelInfo.model_validate(m) for m in data]
            except (ValueError, ValidationError) as exc:
                raise VictimFailingError(f"{self.url}/v1/models is not a model list ({exc}); is this a Heist "
                                         "victim API?") from None
        if last.startswith("HTTP"):
            raise VictimFailingError(f"{self.url}/v1/models keeps failing ({last})")
        raise VictimUnreachableError(f"cannot reach {self.url}: {last}; is the victim server running?")

    async def model_info(self, name: str) -> ModelInfo:
        models = await self.models()
        for m in models:
            if m.name == name:
                return m
        known = ", ".join(m.name for m in models) or "none"
        raise UnknownModelError(f"the victim at {self.url} serves no model {name!r} (it serves: {known})")

    async def translate(self, model: str, key: str, image: bytes, media_type: str = "image/png") -> Outcome:
        """``POST /v1/models/{model}/translate`` with a raw image body; never raises for HTTP outcomes."""
        t0 = time.monotonic()
        try:
            resp = await self.http.post(
                f"/v1/models/{model}/translate", content=image,
                headers={"Content-Type": media_type, "X-API-Key": key, "Accept": self.config.accept},
            )
        except httpx.HTTPError as exc:
            return Outcome(None, code="transport_error", error=describe_transport_error(exc),
                           latency_s=time.monotonic() - t0)
        out = Outcome(
            resp.status_code, headers=RateHeaders.parse(resp.headers),
            content_type=resp.headers.get("content-type", ""), request_id=resp.headers.get("x-request-id"),
            latency_s=time.monotonic() - t0,
        )
        if out.ok:
            out.body = resp.content
        else:
            out.code, out.detail = _error_fields(resp)
        return out


def fetch_model_info(url: str, model: str) -> ModelInfo:
    """``model``'s public entry of ``GET /v1/models`` (no query spent); one-line errors as
    :meth:`VictimClient.model_info`."""

    async def go() -> ModelInfo:
        async with VictimClient(url) as client:
            return await client.model_info(model)

    return asyncio.run(go())
