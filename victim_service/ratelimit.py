"""Per-client rate limits (GCRA) and total/daily quotas, answered in one step.

Two backends with the same semantics:

- :class:`RedisLimiter`: one atomic Lua script (``ratelimit.lua``) run with ``EVALSHA`` (``EVAL`` when
  Redis answers ``NOSCRIPT``, e.g. after a restart), clock from Redis ``TIME``: exact across uvicorn
  workers and hosts, one round trip per request.
- :class:`MemoryLimiter`: the same algorithm in-process (the embedded default when no ``redis_url`` is
  set). It is exact only inside one process: run a single worker without Redis.

GCRA (the generic cell rate algorithm of ATM networks, as in redis-cell): with emission interval
``T = 1/rate`` and burst ``B``, a request arriving at ``now`` is admitted iff
``max(TAT, now) + T - B*T <= now``, after which ``TAT := max(TAT, now) + T``. ``B`` requests may arrive
at once, then one every ``T``. Quotas are checked first and only admitted requests consume them, so a
rate-limited request costs nothing. The daily quota resets at 00:00 UTC.
"""

from __future__ import annotations

import hashlib
import math
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import redis
import redis.asyncio as aioredis
from redis.exceptions import NoScriptError

from victim_service.errors import redis_unavailable
from victim_service.settings import TierSpec

_US = 1_000_000
_DAY_US = 86_400 * _US
_REASONS: dict[int, Literal["ok", "rate_limited", "quota_exhausted"]] = {
    0: "ok", 1: "rate_limited", 2: "quota_exhausted", 3: "quota_exhausted"
}


@dataclass(frozen=True)
class Decision:
    """The limiter's answer for one request.

    Attributes:
        allowed: admit the request.
        reason: ``ok``, ``rate_limited`` or ``quota_exhausted``.
        quota: which quota refused (``total`` or ``daily``), else None.
        limit: the burst (``RateLimit-Limit``); None when the tier has no rate limit.
        remaining: requests that could be sent right now after this one; None without a rate limit.
        reset_s: seconds until the bucket is full again (or the daily quota resets).
        retry_after_s: seconds after which a retry is admitted; None when waiting does not help.
        total_left / daily_left: quota left after this request; None when the quota is not set.
    """

    allowed: bool
    reason: Literal["ok", "rate_limited", "quota_exhausted"] = "ok"
    quota: Literal["total", "daily"] | None = None
    limit: int | None = None
    remaining: int | None = None
    reset_s: float = 0.0
    retry_after_s: float | None = None
    total_left: int | None = None
    daily_left: int | None = None

    def headers(self) -> dict[str, str]:
        """``RateLimit-*`` / ``Retry-After`` / ``X-Quota-Remaining`` response headers (integers, rounded up)."""
        h: dict[str, str] = {}
        if self.limit is not None:
            h["RateLimit-Limit"] = str(self.limit)
            h["RateLimit-Remaining"] = str(max(self.remaining or 0, 0))
            h["RateLimit-Reset"] = str(math.ceil(max(self.reset_s, 0.0)))
        if self.total_left is not None:
            h["X-Quota-Remaining"] = str(max(self.total_left, 0))
        if self.daily_left is not None:
            h["X-Quota-Daily-Remaining"] = str(max(self.daily_left, 0))
        if not self.allowed and self.retry_after_s is not None:
            h["Retry-After"] = str(max(1, math.ceil(self.retry_after_s)))
            h["Retry-After-Ms"] = str(max(1, math.ceil(self.retry_after_s * 1000)))
        return h


def _decision(raw: list[int], tier: TierSpec) -> Decision:
    allowed, reason, retry_us, remaining, reset_us, total_left, daily_left = (int(v) for v in raw)
    return Decision(
        allowed=bool(allowed),
        reason=_REASONS[reason],
        quota="total" if reason == 2 else "daily" if reason == 3 else None,
        limit=tier.burst if tier.rate is not None else None,
        remaining=remaining if tier.rate is not None else None,
        reset_s=reset_us / _US,
        retry_after_s=None if retry_us < 0 or allowed else retry_us / _US,
        total_left=None if tier.quota_total is None else total_left,
        daily_left=None if tier.quota_daily is None else daily_left,
    )


def _args(tier: TierSpec, cost: int) -> tuple[int, int, int, int, int]:
    interval = round(_US / tier.rate) if tier.rate is not None else 0
    return (
        interval,
        tier.burst,
        cost,
        -1 if tier.quota_total is None else tier.quota_total,
        -1 if tier.quota_daily is None else tier.quota_daily,
    )


class Limiter(ABC):
    """``await check(client, tier)`` -> :class:`Decision`; :class:`BackendUnavailableError` when the store is down."""

    backend: str = "limiter"

    @abstractmethod
    async def check(self, client: str, tier: TierSpec, cost: int = 1) -> Decision: ...

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        return None


class MemoryLimiter(Limiter):
    """In-process GCRA + quotas with the script's exact arithmetic (integer microseconds).

    ``clock`` returns wall-clock microseconds (``time.time()``-based by default; tests inject a fake one).
    """

    backend = "memory"

    def __init__(self, clock: Callable[[], int] | None = None) -> None:
        self._clock = clock or (lambda: time.time_ns() // 1000)
        self._lock = threading.Lock()
        self._tat: dict[str, int] = {}
        self._total: dict[str, int] = {}
        self._daily: dict[tuple[str, int], int] = {}

    def check_sync(self, client: str, tier: TierSpec, cost: int = 1) -> Decision:
        interval, burst, cost, qtotal, qdaily = _args(tier, cost)
        with self._lock:
            now = self._clock()
            day = now // _DAY_US
            day_reset = (day + 1) * _DAY_US - now
            total_left = qtotal - self._total.get(client, 0) if qtotal >= 0 else -1
            daily_left = qdaily - self._daily.get((client, day), 0) if qdaily >= 0 else -1
            if qtotal >= 0 and total_left < cost:
                return _decision([0, 2, -1, 0, 0, total_left, daily_left], tier)
            if qdaily >= 0 and daily_left < cost:
                return _decision([0, 3, day_reset, 0, day_reset, total_left, daily_left], tier)
            remaining, reset = -1, 0
            if interval > 0:
                tat = max(self._tat.get(client, 0), now)
                new_tat = tat + interval * cost
                allow_at = new_tat - interval * burst
                if allow_at > now:
                    return _decision([0, 1, allow_at - now, 0, tat - now, total_left, daily_left], tier)
                self._tat[client] = new_tat
                remaining = (now - allow_at) // interval
                reset = new_tat - now
            if qtotal >= 0:
                self._total[client] = self._total.get(client, 0) + cost
                total_left -= cost
            if qdaily >= 0:
                if len(self._daily) > 10_000:  # drop counters of past days
                    self._daily = {k: v for k, v in self._daily.items() if k[1] >= day}
                self._daily[(client, day)] = self._daily.get((client, day), 0) + cost
                daily_left -= cost
            return _decision([1, 0, 0, remaining, reset, total_left, daily_left], tier)

    async def check(self, client: str, tier: TierSpec, cost: int = 1) -> Decision:
        return self.check_sync(client, tier, cost)


def load_script() -> str:
    return (Path(__file__).parent / "ratelimit.lua").read_text()


class RedisLimiter(Limiter):
    """GCRA + quotas in Redis: one ``EVALSHA`` per request, ``EVAL`` fallback on ``NOSCRIPT``.

    Keys: ``{prefix}rl:{client}`` (TAT), ``{prefix}quota:total:{client}``, ``{prefix}quota:day:{client}:{day}``.
    """

    backend = "redis"

    def __init__(self, r: aioredis.Redis, prefix: str) -> None:
        self.r = r
        self.prefix = prefix
        self.script = load_script()
        self.sha = hashlib.sha1(self.script.encode()).hexdigest()

    def keys(self, client: str) -> list[str]:
        p = self.prefix
        return [f"{p}rl:{client}", f"{p}quota:total:{client}", f"{p}quota:day:{client}:"]

    async def check(self, client: str, tier: TierSpec, cost: int = 1) -> Decision:
        keys = self.keys(client)
        args = _args(tier, cost)
        with redis_unavailable("the rate limiter"):
            try:
                raw = await self.r.evalsha(self.sha, len(keys), *keys, *args)
            except NoScriptError:
                raw = await self.r.eval(self.script, len(keys), *keys, *args)
        return _decision(raw, tier)

    async def ping(self) -> bool:
        try:
            return bool(await self.r.ping())
        except (redis.RedisError, OSError):
            return False

    async def reset(self, client: str) -> None:
        """Forget a client's rate state and quotas (admin use)."""
        await self.r.delete(*self.keys(client)[:2])
