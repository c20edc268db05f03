"""Client-side pacing for one API key: send as fast as the victim's rate limit allows, no faster.

The victim's limiter is a GCRA / token bucket: ``RateLimit-Limit`` is the burst ``B``,
``RateLimit-Remaining`` (``R``) the whole tokens left after an admitted request, and tokens refill at an
unknown rate ``r`` per second up to ``B``. A 429 carries ``Retry-After`` (whole seconds) and, from the
Heist victim, ``Retry-After-Ms``: exactly when one token will exist. The pacer keeps per key:

**Tokens now.** From the freshest observation ``(seq_j, R_j, t_j)`` (the response with the highest send
number carrying rate headers; ``t_j`` its send time, the server admits a request right after it
arrives): the bucket replayed from ``R_j`` at ``t_j``: refill at ``r`` capped at ``B``, minus one at the send time
of every later request in flight (or answered without headers but consuming). A request goes only
when this is at least 1. Each response re-anchors on the server's own count, so estimation
errors never accumulate, and surplus tokens the server reports are used at once.

**The rate r.** ``C_k = consumed_k + R_k`` (tokens ever granted, up to the floor in ``R``) grows at
exactly ``r`` while the bucket is not full, so ``r`` is the slope of ``C`` over a *stretch* that ends
when a response shows a full bucket (``R = B - 1`` after an admission: tokens may have been lost).
Points are *exact* (no floor error) when the bucket was full (tokens after are exactly ``B - 1``) and
for 429s with ``Retry-After-Ms = x`` (exactly one token at ``t + x``: a virtual point
``(t + x, consumed + 1)``). Estimates, best first: the slope between the stretch's exact points (or of
``C``) once it spans ``min_span_s``; the last exact slope; the last long stretch's slope; lower bounds
``(C_b - C_a - [a not exact]) / (t_b - t_a)`` from stretches that ended full; the bootstrap
``(B - R - 1) / RateLimit-Reset``. The first time tokens run out with nothing measured, one probe goes
at once: its 429 and ``Retry-After-Ms`` pin the rate down. While the bucket keeps showing full and no
exact rate is known the pace doubles per response (exploration); a 429 ends it.

**Dates.** "Send time" above is when the limiter saw the request, as far as the client can tell: the
send time on an idle server, the answer minus the shortest latency seen for that kind of answer on a
busy one (``LanePacer._limiter_time``). Lower bounds divide by the widest span the two limiter times can
have (first send to last answer), so that they stay lower bounds under any queueing.

**Back-off.** After a 429 no request goes before ``Retry-After-Ms`` (else ``Retry-After``). The
concurrency cap is AIMD: halved on 503 and transport errors, ``+1/cap`` per success, within
``[1, max_concurrency]``. Until the first answer only one request is in flight.

Without rate headers (an unlimited tier) only the concurrency cap applies.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import httpx


@dataclass(frozen=True)
class RateHeaders:
    """Rate-limit information of one response. Times in seconds; None when the header is absent."""

    limit: int | None = None
    remaining: int | None = None
    reset_s: float | None = None
    retry_after_s: float | None = None
    retry_exact: bool = False  # from Retry-After-Ms (not rounded up to whole seconds)
    quota_remaining: int | None = None

    @classmethod
    def parse(cls, headers: httpx.Headers) -> RateHeaders:
        def num(name: str) -> float | None:
            v = headers.get(name)
            if v is None:
                return None
            try:
                f = float(v.strip())
            except ValueError:
                return None
            return f if math.isfinite(f) and f >= 0 else None

        retry_ms = num("retry-after-ms")
        retry = retry_ms / 1000.0 if retry_ms is not None else num("retry-after")
        lim, rem, quota = num("ratelimit-limit"), num("ratelimit-remaining"), num("x-quota-remaining")
        return cls(
            limit=int(lim) if lim is not None else None,
            remaining=int(rem) if rem is not None else None,
            reset_s=num("ratelimit-reset"),
            retry_after_s=retry,
            retry_exact=retry_ms is not None,
            quota_remaining=int(quota) if quota is not None else None,
        )


@dataclass
class _Point:
    t: float  # seconds (monotonic): the best estimate of when the limiter saw the request
    c: float  # tokens granted so far, as far as the responses tell
    exact: bool = False
    lo: float = -math.inf  # the limiter saw it no earlier than this (the send time) ...
    hi: float = math.inf  # ... and no later than this (the answer's arrival)


@dataclass
class _Done:
    t: float  # when the limiter saw the request, as dated by LanePacer._limiter_time
    sent: float  # send time: the limiter saw it no earlier ...
    answered: float  # ... and no later than the answer's arrival
    consumed: bool
    remaining: int | None
    rate_limited: bool
    retry_after_s: float | None
    retry_exact: bool


def _slope(a: _Point, b: _Point) -> float | None:
    return (b.c - a.c) / (b.t - a.t) if b.t > a.t and b.c > a.c else None


@dataclass
class LanePacer:
    """Pacing state of one API key (see module docstring). Times are ``time.monotonic()`` seconds."""

    max_concurrency: int = 8
    min_span_s: float = 0.5
    safety: float = 0.005  # fraction of the estimated rate left unused (covers admission jitter)
    probe_interval_s: float = 0.25
    jitter_s: float = 0.005  # allowance for send-to-admission jitter in rate lower bounds

    limit: int | None = None
    headers_seen: bool = False
    no_limit: bool = False
    in_flight: dict[int, float] = field(default_factory=dict)  # seq -> send time
    blocked_until: float = 0.0
    conc_cap: float = 0.0
    _seq: int = 0
    _responses: int = 0
    _obs: tuple[int, int, float] | None = None  # (seq, remaining, send time)
    _after_consumed: dict[int, float] = field(default_factory=dict)  # seq -> send time, no headers
    _done: dict[int, _Done] = field(default_factory=dict)
    _settled: int = 0
    _consumed: int = 0
    _segment: list[_Point] = field(default_factory=list)
    _exact_rate: float | None = None
    _prev_rate: float | None = None
    _lower_bounds: list[float] = field(default_factory=list)
    _bootstrap: float | None = None
    _boost: float = 1.0
    _probe_at: float | None = None
    _probing: bool = False
    _probed: bool = False
    _lat_ok: float | None = None  # shortest send-to-answer time of a success (s)
    _lat_429: float | None = None  # ... and of a 429

    def __post_init__(self) -> None:
        self.conc_cap = float(self.max_concurrency)

    # --- estimates -----------------------------------------------------------------------------------
    def _segment_rate(self) -> tuple[float | None, float | None]:
        """(long-stretch slope, exact slope of any span) of the current stretch."""
        seg = self._segment
        exact = sorted((p for p in seg if p.exact), key=lambda p: p.t)
        ex = _slope(exact[0], exact[-1]) if len(exact) >= 2 and exact[-1].t - exact[0].t >= 0.02 else None
        long: float | None = None
        if len(seg) >= 2:
            first, last = min(seg, key=lambda p: p.t), max(seg, key=lambda p: p.t)
            if last.t - first.t >= self.min_span_s and last.c - first.c >= 2:
                long = ex if ex is not None and exact[-1].t - exact[0].t >= self.min_span_s else _slope(first, last)
        return long, ex

    def _measured_rate(self) -> float | None:
        long, ex = self._segment_rate()
        best = long or ex or self._exact_rate or self._prev_rate
        lb = max(self._lower_bounds) if self._lower_bounds else None
        if lb is not None and (best is None or lb > best):
            best = lb
        return best

    def rate(self) -> float | None:
        """Estimated refill rate in requests per second (None while unknown)."""
        m = self._measured_rate()
        return m if m is not None else self._bootstrap

    def tokens(self, now: float) -> float | None:
        """Estimated whole tokens available now (None before any rate-limit header)."""
        if self._obs is None or self.limit is None:
            return None
        seq_j, r_j, t_j = self._obs
        r = (self.rate() or 0.0) * self._boost * (1.0 - self.safety)
        cap = float(self.limit)
        # replay the bucket from observation j: refill (capped at B), minus one per later request
        later = sorted([t for s, t in self.in_flight.items() if s > seq_j] +
                       [t for s, t in self._after_consumed.items() if s > seq_j])
        tokens, t_prev = float(r_j), t_j
        for t in later:
            tokens = min(cap, tokens + r * max(0.0, t - t_prev)) - 1.0
            t_prev = max(t_prev, t)
        return min(cap, tokens + r * max(0.0, now - t_prev))

    def concurrency(self) -> int:
        if self._responses == 0:
            return 1
        return max(1, int(self.conc_cap))

    def delay(self, now: float) -> float | None:
        """0 when a request may go now; else seconds to wait; None = wait for a response."""
        if now < self.blocked_until:
            return self.blocked_until - now
        if len(self.in_flight) >= self.concurrency():
            return None
        if self.no_limit or self._obs is None:
            return 0.0
        avail = self.tokens(now)
        if avail is None or avail >= 1.0 - 1e-9:
            return 0.0
        if self._measured_rate() is None and not self._probed:
            # Nothing measured yet: one early probe. Its 429 carries Retry-After-Ms, which with the exact
            # full-bucket point of the first answer gives the rate at once (else the bootstrap is used).
            if self.in_flight:
                return None
            self._probing = True
            return 0.0
        r = self.rate()
        if r and r > 0:
            return max((1.0 - avail) / (r * self._boost * (1.0 - self.safety)), 1e-4)  # same rate as tokens()
        if self.in_flight:
            return None
        if self._probe_at is None:  # unknown rate, nothing in flight: probe (a 429 says when to retry)
            self._probe_at = now + self.probe_interval_s
        return 0.0 if now >= self._probe_at else self._probe_at - now

    # --- events --------------------------------------------------------------------------------------
    def on_send(self, now: float) -> int:
        self._probe_at = None
        if self._probing:
            self._probing, self._probed = False, True
        seq = self._seq
        self._seq += 1
        self.in_flight[seq] = now
        return seq

    def on_response(self, seq: int, now: float, status: int | None, code: str | None, h: RateHeaders) -> None:
        """Record the outcome of request ``seq``; ``status`` None = no HTTP answer (transport error)."""
        t_send = self.in_flight.pop(seq, now)
        self._responses += 1
        rate_limited = status == 429 and code == "rate_limited"
        has_rl = h.limit is not None and h.remaining is not None
        # An answer without rate headers from a server that sends them means the limiter never ran
        # (e.g. 503 backend_unavailable): no token was used.
        consumed = (status is not None and status != 429 and status not in (401, 403, 404, 406)
                    and (has_rl or not self.headers_seen))
        if has_rl:
            self.headers_seen = True
            self.limit = h.limit
        elif status == 200 and not self.headers_seen:
            self.no_limit = True
        if status == 429 and h.retry_after_s is not None:
            self.blocked_until = max(self.blocked_until, now + h.retry_after_s)
        if rate_limited:
            self._boost = 1.0
        if status == 503 or status is None:
            self.conc_cap = max(1.0, self.conc_cap / 2)
        elif status == 200:
            self.conc_cap = min(float(self.max_concurrency), self.conc_cap + 1.0 / max(self.conc_cap, 1.0))
        t_limiter = self._limiter_time(t_send, now, status)
        if has_rl and (self._obs is None or seq > self._obs[0]):
            self._obs = (seq, int(h.remaining), t_limiter)  # type: ignore[arg-type]
            self._after_consumed = {s: t for s, t in self._after_consumed.items() if s > seq}
            if consumed and h.reset_s and h.limit and h.remaining is not None:
                boot = (h.limit - h.remaining - 1) / h.reset_s
                if boot > 0:
                    self._bootstrap = max(self._bootstrap or 0.0, boot)
        elif consumed and not has_rl and self._obs is not None and seq > self._obs[0]:
            self._after_consumed[seq] = t_send
        self._done[seq] = _Done(t_limiter, t_send, now, consumed, h.remaining if has_rl else None, rate_limited,
                                h.retry_after_s, h.retry_exact)
        self._settle()

    def _limiter_time(self, sent: float, answered: float, status: int | None) -> float:
        """When the server's limiter saw a request sent at ``sent`` and answered at ``answered``, on the
        send-time clock (minus the fixed half round trip, which cancels in every slope).

        On an idle server that is the send time, but a busy one queues requests before its handler (and
        so the limiter) runs, and the send time then dates the limiter's clock seconds too early
        (measured on the real service with two busy cores: a 1/s tier read as 4/s). The limiter runs
        first in the handler, so the answer comes a fixed time after it: a round trip for a 429 (nothing
        runs after the limiter), a round trip plus the model's time for a success. The shortest latency
        seen of each kind (an unqueued request) measures that time; the date is the answer minus it,
        never before the send. Approximate when request sizes (and so service times) vary a lot.
        """
        latency = answered - sent
        if status == 429:
            self._lat_429 = latency if self._lat_429 is None else min(self._lat_429, latency)
            return max(sent, answered - self._lat_429)
        if status is not None and 200 <= status < 300:
            self._lat_ok = latency if self._lat_ok is None else min(self._lat_ok, latency)
            return max(sent, answered - self._lat_ok)
        return sent

    def _close_segment(self) -> None:
        long, ex = self._segment_rate()
        if long is not None:
            self._prev_rate = long
        if ex is not None:
            self._exact_rate = ex
        self._segment = []

    def _settle(self) -> None:
        """Advance over completed requests in send order, extending the current stretch of ``C``."""
        while self._settled in self._done:
            d = self._done.pop(self._settled)
            self._settled += 1
            self._consumed += int(d.consumed)
            if self.limit is None:
                continue
            if d.rate_limited and d.retry_exact and d.retry_after_s is not None:
                x = d.retry_after_s
                self._segment.append(_Point(d.t + x, self._consumed + 1, exact=True, lo=d.sent + x,
                                            hi=d.answered + x))
                ex = self._segment_rate()[1]
                if ex is not None:
                    self._exact_rate = ex
                continue
            if d.remaining is None:
                continue
            full = d.consumed and d.remaining >= self.limit - 1
            point = _Point(d.t, self._consumed + d.remaining, exact=full, lo=d.sent, hi=d.answered)
            if full:
                # widest interval the two limiter times can span, so that a queueing server (admission
                # long after the send) cannot turn the bound into an overestimate
                bounds = [(point.c - a.c - (0 if a.exact else 1)) / (point.hi - a.lo + self.jitter_s)
                          for a in self._segment[-32:] if point.t > a.t and point.hi > a.lo]
                if bounds and max(bounds) > 0:
                    self._lower_bounds = [*self._lower_bounds[-7:], max(bounds)]
                if self._segment and self._exact_rate is None:
                    self._boost = min(self._boost * 2.0, 64.0)  # explore: the bucket filled while we waited
                self._close_segment()
            else:
                self._boost = max(1.0, self._boost / 2.0)
            self._segment.append(point)

    @property
    def sent(self) -> int:
        return self._seq


class _Answer(Protocol):
    status: int | None
    code: str | None
    headers: RateHeaders


_A = TypeVar("_A", bound=_Answer)


class PacedSender:
    """One key's requests sent through a :class:`LanePacer` from any number of coroutines.

    ``await sender.send(fn)`` waits until the pacer lets a request go, runs ``fn()`` (a coroutine making
    exactly one request and returning an object with ``status``, ``code`` and ``headers``), and reports
    the answer back. It is the pacing of :mod:`attacker.harvest` for callers that only need "send this,
    respecting the limit" (the membership attack, for example); 429s become waits, never errors.
    """

    def __init__(self, pacer: LanePacer) -> None:
        self.pacer = pacer
        self._answered = asyncio.Event()

    async def send(self, fn: Callable[[], Awaitable[_A]]) -> _A:
        while True:
            d = self.pacer.delay(time.monotonic())
            if d == 0:
                break
            if d is None:  # wait for an answer (no await between delay() and clear(): no lost wake-up)
                self._answered.clear()
                await self._answered.wait()
            else:
                await asyncio.sleep(d)
        seq = self.pacer.on_send(time.monotonic())
        try:
            out = await fn()
        except BaseException:
            self.pacer.on_response(seq, time.monotonic(), None, "cancelled", RateHeaders())
            self._answered.set()
            raise
        self.pacer.on_response(seq, time.monotonic(), out.status, out.code, out.headers)
        self._answered.set()
        return out
