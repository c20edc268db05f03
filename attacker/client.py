"""HTTP client for the victim API (``docs/CONTRACTS.md``, Victim HTTP API). Async, httpx.

:class:`VictimClient` does single requests and reports what happened (:class:`Outcome`);
:meth:`VictimClient.translate_retrying` is the one retry policy for a single query, used by every caller
but the harvester (whose pacing, key rotation and quotas live in :mod:`attacker.pacing` and
:mod:`attacker.harvest`; it shares :func:`retry_wait`). :class:`VictimAdminClient` talks to the victim's
admin API (keys, the monitor's view of clients). The attacker only knows the URL, its key(s), the model
name and ``GET /v1/models``.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import httpx
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from attacker.errors import (
    AttackError,
    ConfigError,
    InputsRefusedError,
    QuotaExhaustedError,
    UnauthorizedError,
    UnknownModelError,
    VictimFailingError,
    VictimProtocolError,
    VictimUnreachableError,
)
from attacker.pacing import RateHeaders
from attacker.victim_info import ModelInfo


class ClientConfig(BaseModel):
    """Network behaviour of the attacker.

    Attributes:
        max_concurrency: requests in flight per API key at most (the pacer may use fewer).
        connect_timeout_s / read_timeout_s: per request.
        max_retries: attempts after the first for one query on 5xx, timeouts and transport errors (the
            harvester and :meth:`VictimClient.translate_retrying`).
        backoff_base_s / backoff_max_s: full-jitter exponential backoff, ``U(0, min(max, base * 2**n))``.
        storm_limit: consecutive failed requests (5xx/transport) with no success in between that stop
            the run (a 5xx storm or a dead server).
        accept: media type asked for; PNG keeps outputs lossless.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

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
    attempts: int = 1  # requests sent for this query (more than 1 after retries: translate_retrying)

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


RETRY_AFTER_CAP_S = 30.0
"""Longest single wait :meth:`VictimClient.translate_retrying` takes for a ``Retry-After`` by default."""
RATE_WAITS = 50
"""429 ``rate_limited`` answers :meth:`VictimClient.translate_retrying` waits out per query by default."""

Send = Callable[[Callable[[], Awaitable["Outcome"]]], Awaitable["Outcome"]]
"""How one request goes out: ``await send(fn)`` runs ``fn()`` (one request) when it may go, e.g.
:meth:`attacker.pacing.PacedSender.send`."""


def backoff_delay(config: ClientConfig, failures: int) -> float:
    """Full-jitter exponential backoff after ``failures`` failed tries (1 after the first):
    ``U(0, min(backoff_max_s, backoff_base_s * 2**failures))``."""
    return random.uniform(0, min(config.backoff_max_s, config.backoff_base_s * 2**failures))


def retry_wait(config: ClientConfig, failures: int, retry_after_s: float | None,
               cap_s: float = RETRY_AFTER_CAP_S) -> float:
    """Seconds before a query that failed ``failures`` times (5xx, transport) may go again: the full-jitter
    backoff (:func:`backoff_delay`), but never less than the answer's ``Retry-After`` (cut to ``cap_s``)."""
    return max(backoff_delay(config, failures), min(retry_after_s or 0.0, cap_s))


def key_label(key: str) -> str:
    """How an API key is named in messages: its last four characters only."""
    return f"(…{key[-4:]})"


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

    async def translate_retrying(
        self, model: str, key: str, image: bytes, media_type: str = "image/png", *, what: str = "the query",
        check: bool = True, max_rate_waits: int | None = RATE_WAITS, max_wait_s: float = RETRY_AFTER_CAP_S,
        send: Send | None = None,
    ) -> Outcome:
        """One query, retried by the client's policy (``self.config``); returns the answer that ended it.

        =============================  ==========================================================================
        2xx                            returned (``Outcome.attempts``: requests sent for it, retries included)
        429 ``rate_limited``           wait ``Retry-After-Ms`` / ``Retry-After`` (at most ``max_wait_s``; without
                                       the header the full-jitter backoff) and ask again, at most
                                       ``max_rate_waits`` times (None: no limit), then
                                       :class:`VictimFailingError`
        429 ``quota_exhausted``        stop at once: :class:`QuotaExhaustedError`
        401 / 403                      stop at once: :class:`UnauthorizedError`
        404                            stop at once: :class:`UnknownModelError`
        other 4xx                      stop at once: :class:`InputsRefusedError` (the input is refused)
        5xx (503 ``overloaded``,       full-jitter backoff ``U(0, min(backoff_max_s, backoff_base_s * 2**n))``
        ``shutting_down`` included)    after the ``n``-th failure, never shorter than ``Retry-After`` (at most
                                       ``max_wait_s``); ask again up to ``config.max_retries`` times, then
                                       :class:`VictimFailingError`
        timeouts, transport errors     as 5xx, then :class:`VictimUnreachableError`
        anything else (1xx, 3xx)       :class:`VictimProtocolError`
        =============================  ==========================================================================

        Args:
            what: names the query in error messages (e.g. ``"candidate 'x'"``).
            check: False returns the answer that ended the query instead of raising (a refusal, quota used
                up, or the last failure once the retries are spent); the caller reads ``status`` / ``code``.
            send: runs each request (e.g. a :class:`attacker.pacing.PacedSender`'s ``send``, so a pacer sees
                every try); default: at once.
        """
        cfg = self.config
        failures = rate_waits = attempts = 0

        def one() -> Awaitable[Outcome]:
            return self.translate(model, key, image, media_type)

        while True:
            out = await (send(one) if send is not None else one())
            attempts += 1
            out.attempts = attempts
            s, h = out.status, out.headers
            if out.ok:
                return out
            if s == 429 and out.code != "quota_exhausted":
                rate_waits += 1
                if max_rate_waits is not None and rate_waits > max_rate_waits:
                    return self._refuse(out, check, VictimFailingError(
                        f"{what}: still rate limited (429) after {max_rate_waits} waits for Retry-After"))
                wait = h.retry_after_s if h.retry_after_s is not None else backoff_delay(cfg, rate_waits)
                await asyncio.sleep(min(wait, max_wait_s))
                continue
            if s is None or s >= 500:
                failures += 1
                if failures > cfg.max_retries:
                    if s is None:
                        return self._refuse(out, check, VictimUnreachableError(
                            f"cannot reach {self.url}: {what} got no answer in {attempts} tries "
                            f"(last: {out.error or 'transport error'})"))
                    return self._refuse(out, check, VictimFailingError(
                        f"the victim at {self.url} keeps failing: {what} failed {failures} times "
                        f"(last: HTTP {s} {out.code or ''} {out.detail})".strip()))
                await asyncio.sleep(retry_wait(cfg, failures, h.retry_after_s, max_wait_s))
                continue
            return self._refuse(out, check, self._refusal(out, model, key, what))

    @staticmethod
    def _refuse(out: Outcome, check: bool, err: AttackError) -> Outcome:
        if check:
            raise err
        return out

    @staticmethod
    def _refusal(out: Outcome, model: str, key: str, what: str) -> AttackError:
        """The typed error of an answer no retry can change (``out.status`` is 3xx/4xx, or 429 quota)."""
        s, code, detail = out.status, out.code, out.detail
        if s == 429:
            when = f"; it resets in {out.headers.retry_after_s:.0f} s" if out.headers.retry_after_s else ""
            return QuotaExhaustedError(f"API key {key_label(key)} has no quota left (429 quota_exhausted{when})")
        if s in (401, 403):
            return UnauthorizedError(f"the victim refused API key {key_label(key)}: {s} {code or 'unauthorized'}: "
                                     f"{detail or 'check --api-key'}")
        if s == 404:
            return UnknownModelError(f"the victim answered 404 {code or ''} for model {model!r}: {detail}".strip())
        if s is not None and 400 <= s < 500:
            return InputsRefusedError(f"the victim refused {what}: HTTP {s} {code or ''} {detail}".strip())
        return VictimProtocolError(f"the victim answered HTTP {s} {code or ''} to {what} ({detail}); the attacker "
                                   "cannot go on")


def fetch_model_info(url: str, model: str) -> ModelInfo:
    """``model``'s public entry of ``GET /v1/models`` (no query spent); one-line errors as
    :meth:`VictimClient.model_info`."""

    async def go() -> ModelInfo:
        async with VictimClient(url) as client:
            return await client.model_info(model)

    return asyncio.run(go())


class AdminApiError(AttackError):
    """The victim's admin API refused a request. ``status``, ``error`` and ``detail`` are the answer's HTTP
    status and JSON error code and detail (:func:`_error_fields`)."""

    code = "admin_refused"

    def __init__(self, message: str, status: int, error: str | None, detail: str) -> None:
        super().__init__(message)
        self.status, self.error, self.detail = status, error, detail


class VictimAdminClient:
    """The victim's admin API over one ``httpx.AsyncClient``: ``async with VictimAdminClient(url, key) as a``.

    Every call sends the admin key (``X-API-Key``) once, without retrying (``create_key`` is not idempotent).
    A transport failure raises :class:`VictimUnreachableError`; any non-2xx answer :class:`AdminApiError` with
    the server's error code and detail.
    """

    def __init__(self, url: str, admin_key: str, timeout_s: float = 30.0) -> None:
        self.url = check_url(url)
        self._key = admin_key
        self._timeout = timeout_s
        self._http: httpx.AsyncClient | None = None

    async def __aenter__(self) -> VictimAdminClient:
        self._http = httpx.AsyncClient(base_url=self.url, timeout=self._timeout,
                                       headers={"User-Agent": "heist-admin/0.1", "X-API-Key": self._key})
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    async def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """``method path`` (JSON ``body``); the decoded JSON answer."""
        if self._http is None:
            raise RuntimeError("VictimAdminClient used outside `async with`")
        try:
            resp = await self._http.request(method, path, json=body)
        except httpx.HTTPError as exc:
            raise VictimUnreachableError(f"cannot reach {self.url}: {describe_transport_error(exc)}") from None
        if not 200 <= resp.status_code < 300:
            code, detail = _error_fields(resp)
            msg = " ".join(f"{self.url}{path} answered HTTP {resp.status_code} {code or ''}".split())
            raise AdminApiError(f"{msg}: {detail}" if detail else msg, resp.status_code, code, detail)
        try:
            return resp.json()
        except ValueError:
            raise VictimProtocolError(f"{self.url}{path} answered HTTP {resp.status_code} with no JSON "
                                      f"({one_line(resp.text, 100)}); is this a Heist victim API?") from None

    async def clients_status(self) -> dict[str, Any]:
        """``GET /v1/admin/clients`` as the service returned it (``{"enabled": ..., "clients": [...]}``)."""
        data = await self.request("GET", "/v1/admin/clients")
        if not isinstance(data, dict) or not isinstance(data.get("clients"), list):
            raise VictimProtocolError(f"{self.url}/v1/admin/clients is not a client list")
        return data

    async def clients(self) -> dict[str, dict[str, Any]]:
        """The monitor's risk row of every client, by client name."""
        return {c["client"]: c for c in (await self.clients_status())["clients"]}

    async def client_risk(self, name: str) -> dict[str, Any]:
        """``GET /v1/admin/clients/NAME/risk``: one client's risk row (404 ``unknown_client`` before its first
        query reaches the monitor)."""
        data = await self.request("GET", f"/v1/admin/clients/{quote(name, safe='')}/risk")
        if not isinstance(data, dict):
            raise VictimProtocolError(f"{self.url}/v1/admin/clients/{name}/risk is not a risk row")
        return data

    async def create_key(self, name: str, tier: str) -> str:
        """``POST /v1/admin/keys``: a new API key for client ``name`` on ``tier``; the plaintext key."""
        data = await self.request("POST", "/v1/admin/keys", {"name": name, "tier": tier})
        if not isinstance(data, dict) or not isinstance(data.get("key"), str):
            raise VictimProtocolError(f"{self.url}/v1/admin/keys answered no key")
        return data["key"]
