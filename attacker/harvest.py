"""Harvest orchestration: ask the victim for ``budget`` pairs as fast as its limits allow, resumably.

One run folder per harvest (``docs/CONTRACTS.md``: attacker run folder). The strategy numbers queries
0, 1, 2, ...; query ``i`` is deterministic, and the pair store records each index once. A new or resumed
harvest asks, in index order, every index the manifest lacks until it holds ``budget`` pairs (or the
input-pixel budget is spent), so a ``kill -9`` followed by the same command ends with exactly
``budget`` pairs: none missing, none twice.

Policy for answers (documented in ``docs/attacker.md``):

=========================  ==========================================================================
2xx                        pair stored (image files, then the manifest line)
429 ``rate_limited``       the key waits ``Retry-After-Ms`` / ``Retry-After``; the query is asked again
429 ``quota_exhausted``    the key is retired; when every key is retired the run stops cleanly
                           (status ``stopped``), keeping every pair
401 / 403                  first answer for that key: stop (:class:`UnauthorizedError`); after the key
                           worked (revoked/banned mid-run): retire the key, go on with the others
404                        stop (:class:`UnknownModelError`)
4xx image errors           the input is recorded as ``refused`` and never asked again; the next index
                           replaces it. More than ``max_refused`` refusals stop the run
                           (:class:`InputsRefusedError`)
5xx, timeouts, transport   retried with full-jitter exponential backoff (503 also halves concurrency),
                           up to ``max_retries`` per query; nothing at all is sent until the failed query
                           may go again (the victim is down or overloaded: a burst of new queries would
                           only fail too); ``storm_limit`` failures in a row (queries in flight together
                           count once) stop the run (:class:`VictimFailingError` /
                           :class:`VictimUnreachableError`)
=========================  ==========================================================================

Every answer (and transport failure) is appended to ``harvest_log.jsonl``, each line naming its session;
``run.json`` gets the ``target`` and ``harvest`` sections (updated every few seconds and at the end). A
session that died without its last update (``kill -9``, a crash) is rebuilt from ``harvest_log.jsonl`` on
resume (status ``killed``), so the totals count every query ever answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import heapq
import itertools
import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, ParamSpec, TypeVar

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from attacker.client import ClientConfig, Outcome, VictimClient, check_url, retry_wait
from attacker.errors import (
    AttackError,
    ConfigError,
    InputsRefusedError,
    RunFolderError,
    UnauthorizedError,
    UnknownModelError,
    VictimFailingError,
    VictimProtocolError,
    VictimUnreachableError,
)
from attacker.files import check_out_folder, folder_lock, open_jsonl_for_append
from attacker.pacing import LanePacer, RateHeaders
from attacker.pairstore import PairStore
from attacker.progress import NO_PROGRESS, ProgressHook
from attacker.runinfo import read_run, update_run
from attacker.strategies import Query, QueryStrategy, build_strategy
from attacker.victim_info import ModelInfo
from translators.codecs import ImageLimits, decode_image, encode_image
from translators.corpus import NamedImage, load_images
from translators.errors import ImageError, first_problem

log = logging.getLogger(__name__)
P = ParamSpec("P")
T = TypeVar("T")

IMAGE_REFUSALS = {
    "empty_body", "not_an_image", "corrupt_image", "too_many_bytes", "too_many_pixels", "too_small", "bad_size",
    "unsupported_format", "unsupported_mode", "unsupported_media_type", "bad_multipart",
}
_DECODE_LIMITS = ImageLimits(max_bytes=1 << 31, max_pixels=1 << 31)


class HarvestConfig(BaseModel):
    """Options of :func:`harvest` (all but the images, which may be in-memory tensors).

    ``budget`` is the number of pairs wanted; ``budget_pixels`` optionally caps the input pixels sent
    (summed over stored pairs); whichever runs out first ends the harvest. ``max_rate`` (requests/s per
    key) slows the harvest below what the victim allows, as a thief that paces itself like a customer
    would (the query monitor's rate signal); it does not change which queries are sent, so a harvest
    resumes with any ``max_rate``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str
    api_keys: list[str] = Field(min_length=1)
    model: str = Field(min_length=1)
    out: Path
    strategy: str = "crops"
    strategy_params: dict[str, Any] = Field(default_factory=dict)
    budget: int = Field(ge=1)
    budget_pixels: int | None = Field(None, ge=1)
    seed: int = 0
    max_rate: float | None = Field(None, gt=0, description="requests/s per key at most (evasion: a customer's pace)")
    client: ClientConfig = Field(default_factory=ClientConfig)
    max_refused: int | None = Field(None, ge=0)
    durable: bool = True
    run_json_every_s: float = Field(5.0, gt=0)


@dataclass
class HarvestResult:
    """Summary of one harvest session (also written to ``run.json``, section ``harvest``)."""

    run_dir: Path
    status: Literal["complete", "stopped"]
    stop_reason: str | None
    pairs: int
    new_pairs: int
    budget: int
    summary: dict[str, Any]

    @property
    def run_json(self) -> Path:
        return self.run_dir / "run.json"

    @property
    def pairs_dir(self) -> Path:
        return self.run_dir / "pairs"


@dataclass
class _Lane:
    label: str
    key: str
    pacer: LanePacer
    state: Literal["active", "exhausted", "revoked"] = "active"
    ever_ok: bool = False
    quota_remaining: int | None = None
    ok: int = 0
    sent: int = 0
    quota_retry_after_s: float | None = None
    last_sent: float = -math.inf  # monotonic s of the lane's last send (for ``max_rate``)


@dataclass
class _Job:
    query: Query
    png: bytes
    attempts: int = 0  # failed attempts so far (5xx, transport)
    sent_at: float = -math.inf  # when the last attempt was sent (monotonic s)


@dataclass
class _Stats:
    started: float = field(default_factory=time.monotonic)
    first_send: float | None = None
    last_answer: float | None = None
    saturated_at: float | None = None  # first sign the rate limit binds (R == 0 or a 429)
    ok_after_saturation: int = 0  # successes of queries sent after ``saturated_at``: the steady rate
    sent: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    rate_limited: int = 0
    quota_refusals: int = 0
    retries: int = 0
    refused: int = 0
    refused_locally: int = 0
    transport_errors: int = 0
    ok: int = 0
    latency_sum: float = 0.0


def _key_fingerprint(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:10]


def _images_id(images: str | Sequence[NamedImage]) -> str:
    if isinstance(images, str):
        return images
    h = hashlib.sha256()
    for im in images:
        h.update(im.name.encode())
        h.update(str(tuple(im.image.shape)).encode())
        h.update(im.image.flatten()[:: max(1, im.image.numel() // 4096)].numpy().tobytes())
    return f"list:{len(images)}:{h.hexdigest()[:16]}"


class Harvester:
    """The harvest loop for one run folder. Use :func:`harvest` / :func:`harvest_async`."""

    def __init__(self, cfg: HarvestConfig, images: str | Sequence[NamedImage], progress: ProgressHook) -> None:
        self.cfg = cfg
        self.images_spec = images
        self.progress = progress
        self.url = check_url(cfg.url)
        self.run_dir = Path(cfg.out)
        self.max_refused = cfg.max_refused if cfg.max_refused is not None else 10 + cfg.budget // 10
        self.lanes = [_Lane(f"k{i}", k, LanePacer(max_concurrency=cfg.client.max_concurrency))
                      for i, k in enumerate(dict.fromkeys(cfg.api_keys))]
        self.stats = _Stats()
        self.fatal: BaseException | None = None
        self.stop_reason: str | None = None
        self._pixels_exhausted = False  # the next query would exceed --budget-pixels: generate no more
        self._wake = asyncio.Event()
        self._retry: list[tuple[float, int, _Job]] = []
        self._tie = itertools.count()
        self._active: dict[int, _Job] = {}  # index -> job generated and not finished
        self._next_index = 0
        self._scale_warned = False
        self._consecutive_failures = 0
        self._pause_until = 0.0  # after a 5xx/transport failure nothing is sent before this (monotonic s)
        self._last_failure = -math.inf  # when the last 5xx/transport failure was seen (monotonic s)
        self._session = 0
        self._last_run_json = 0.0
        self._quota_warned = False
        self._ok_pixels = 0
        self._prior_pairs = 0

    # --- setup ---------------------------------------------------------------------------------------
    def _check_resume(self, info: ModelInfo, strategy: QueryStrategy) -> dict[str, Any]:
        run = read_run(self.run_dir)
        identity = {
            "model": self.cfg.model, "strategy": self.cfg.strategy,
            # as run.json holds it: JSON turns tuples (zoom, scale ranges) into lists
            "strategy_params": strategy.params.model_dump(mode="json"),
            "seed": self.cfg.seed, "images": _images_id(self.images_spec),
        }
        prev = run.get("harvest", {}).get("identity")
        if prev is not None and isinstance(prev.get("strategy_params"), dict):
            # a harvest recorded before a parameter existed was made with the value that reproduces it
            prev = {**prev, "strategy_params": {**strategy.params.RECORDED_BEFORE, **prev["strategy_params"]}}
        if prev is not None and prev != identity:
            diff = [k for k in identity if prev.get(k) != identity[k]]
            raise RunFolderError(
                f"{self.run_dir} holds a harvest with different {', '.join(diff)} "
                f"({', '.join(f'{k}={prev.get(k)!r}' for k in diff)}); repeat the original options to resume "
                "or use a new --out")
        self._session = len(run.get("harvest", {}).get("sessions", [])) + 1
        return identity

    def _reconcile_dead_sessions(self, logged: list[dict[str, Any]]) -> None:
        """Rebuild, from ``harvest_log.jsonl``, every earlier session ``run.json`` still calls ``running``.

        Called under the folder lock, so such a session is dead: killed (``kill -9``) or crashed before its
        last ``run.json`` update, which then undercounts it. The log has one line per answer, each naming its
        session; the session becomes ``killed`` with the counts of its lines.
        """
        section = read_run(self.run_dir).get("harvest", {})
        sessions = section.get("sessions", [])
        logged_sessions = {r["session"] for r in logged if isinstance(r.get("session"), int)}
        self._session = max([len(sessions), *logged_sessions]) + 1  # never reuse a number the log holds
        if not any(s.get("status") == "running" for s in sessions):
            return
        by_session: dict[Any, list[dict[str, Any]]] = {}
        for r in logged:
            by_session.setdefault(r.get("session"), []).append(r)
        stored = {r.query_index: r.request_id for r in self.store.ok_records()}
        fixed = [_session_from_log(s, by_session.get(s.get("session"), []), stored) if s.get("status") == "running"
                 else s for s in sessions]
        for s in fixed:
            if s.get("status") == "killed":
                log.warning("harvest session %s ended without a word (kill -9 or crash): %d queries, %d pairs, "
                            "counted from harvest_log.jsonl", s.get("session"), s["queries_sent"], s["pairs_added"])
        update_run(self.run_dir, harvest={**section, "sessions": fixed})

    # --- job supply ----------------------------------------------------------------------------------
    def _pixels_used(self) -> int:
        return self._ok_pixels + sum(j.query.pixels for j in self._active.values())

    def _new_job(self) -> _Job | None:
        """The next query to generate, or None when the budget is covered."""
        while True:
            if len(self.store) + len(self._active) >= self.cfg.budget or self._pixels_exhausted:
                return None
            done = self.store.records
            while self._next_index in done or self._next_index in self._active:
                self._next_index += 1
            q = self.strategy.make(self._next_index)
            if self.cfg.budget_pixels is not None and self._pixels_used() + q.pixels > self.cfg.budget_pixels:
                self._pixels_exhausted = True
                self.stop_reason = self.stop_reason or "pixel_budget"
                return None
            self._next_index += 1
            h, w = q.image.shape[-2:]
            why = self.info.accepts(int(h), int(w))  # before encoding: a photo below size_multiple fits to 0x0
            png = encode_image(q.image, "png") if why is None else b""
            if why is None and self.info.max_bytes is not None and len(png) > self.info.max_bytes:
                why = f"{len(png)} bytes exceed max_bytes {self.info.max_bytes}"
            if why is not None:  # never spend a query on an input the published limits refuse
                self.stats.refused_locally += 1
                self._record_refusal(q, "refused_locally", why)
                continue
            job = _Job(q, png)
            self._active[q.index] = job
            return job

    def _record_refusal(self, q: Query, code: str, detail: str) -> None:
        self.store.add_refused(q.index, source=q.source, crop=q.crop, code=code, detail=detail[:300])
        self.stats.refused += 1
        if self.stats.refused > self.max_refused:
            raise InputsRefusedError(
                f"the victim refused {self.stats.refused} inputs (last: {code}: {detail}); the strategy makes "
                f"inputs this model does not accept (limits: {self.info.model_dump(exclude_none=True)})")

    def _take_job(self, now: float) -> _Job | None:
        if self._retry and self._retry[0][0] <= now:
            return heapq.heappop(self._retry)[2]
        return self._new_job()

    def _requeue(self, job: _Job, not_before: float) -> None:
        heapq.heappush(self._retry, (not_before, next(self._tie), job))

    # --- lanes ---------------------------------------------------------------------------------------
    def _live_lanes(self) -> list[_Lane]:
        return [ln for ln in self.lanes if ln.state == "active"]

    def _pick_lane(self, now: float) -> tuple[_Lane | None, float | None]:
        """A lane that may send now (fewest sent first), or None and how long to wait (None = a response)."""
        if now < self._pause_until:  # backing off after a 5xx/transport failure: no lane sends
            return None, self._pause_until - now
        best: _Lane | None = None
        wait: float | None = None
        for ln in self._live_lanes():
            if ln.quota_remaining is not None and ln.quota_remaining - len(ln.pacer.in_flight) <= 0:
                if ln.quota_remaining <= 0 and not ln.pacer.in_flight:
                    ln.state = "exhausted"
                    log.warning("key %s: quota used up (X-Quota-Remaining: 0)", ln.label)
                continue
            d = ln.pacer.delay(now)
            if d is not None and self.cfg.max_rate is not None:
                d = max(d, ln.last_sent + 1.0 / self.cfg.max_rate - now, 0.0)
            if d == 0.0:
                if best is None or ln.sent < best.sent:
                    best = ln
            elif d is not None:
                wait = d if wait is None else min(wait, d)
        return best, wait

    # --- the loop ------------------------------------------------------------------------------------
    async def run(self) -> HarvestResult:
        async with VictimClient(self.url, self.cfg.client,
                                connections=self.cfg.client.max_concurrency * len(self.lanes)) as client:
            self.client = client
            # everything that can fail on bad options fails before the run folder is touched
            self.info = await client.model_info(self.cfg.model)
            imgs = self.images_spec if not isinstance(self.images_spec, str) else load_images(self.images_spec)
            self.strategy = build_strategy(self.cfg.strategy, imgs, self.info, self.cfg.strategy_params,
                                           self.cfg.seed, budget=self.cfg.budget)
            self.identity = self._check_resume(self.info, self.strategy)
            self.run_dir.mkdir(parents=True, exist_ok=True)
            with folder_lock(self.run_dir):
                self.identity = self._check_resume(self.info, self.strategy)  # again, now that we hold the lock
                self.store = PairStore(self.run_dir / "pairs", durable=self.cfg.durable).open()
                self.log_file, logged = open_jsonl_for_append(self.run_dir / "harvest_log.jsonl")
                self._reconcile_dead_sessions(logged.records)
                try:
                    if self.strategy.adaptive:
                        for rec in self.store.ok_records():
                            x, y = self.store.load_pair(rec)
                            self.strategy.observe(rec.query_index, x, y)
                    self._prior_pairs = len(self.store)
                    self._ok_pixels = sum((r.in_hw[0] * r.in_hw[1]) if r.in_hw else 0 for r in self.store.ok_records())
                    self._write_run("running")
                    self.progress.start("harvest", self.cfg.budget, min(len(self.store), self.cfg.budget))
                    try:
                        await self._loop()
                    finally:
                        self.progress.finish("harvest")
                except BaseException as exc:
                    status = "interrupted" if isinstance(exc, asyncio.CancelledError | KeyboardInterrupt) else "failed"
                    self._write_run(status, error=str(exc) or type(exc).__name__)
                    raise
                finally:
                    self.store.close()
                    self.log_file.close()
                status: Literal["complete", "stopped"] = "complete" if len(self.store) >= self.cfg.budget else "stopped"
                if status == "complete":
                    self.stop_reason = None
                summary = self._write_run(status)
        return HarvestResult(self.run_dir, status, self.stop_reason, len(self.store),
                             len(self.store) - self._prior_pairs, self.cfg.budget, summary)

    async def _loop(self) -> None:
        tasks: set[asyncio.Task[None]] = set()
        try:
            while True:
                now = time.monotonic()
                busy = any(not t.done() for t in tasks)  # done callbacks may not have pruned `tasks` yet
                if now - self._last_run_json >= self.cfg.run_json_every_s:
                    self._write_run("running")
                if self.fatal is not None:
                    break
                if not self._live_lanes():
                    if all(ln.state == "revoked" for ln in self.lanes):
                        self.fatal = UnauthorizedError("every API key was refused (401/403) after working: the "
                                                       "victim revoked them; the pairs so far are kept")
                    else:
                        self.stop_reason = "quota_exhausted"
                    break
                lane, wait = self._pick_lane(now)
                job = None
                if lane is not None:
                    job = self._take_job(now)
                    if job is None and not busy and not self._retry:
                        break  # budget covered and nothing outstanding
                elif not busy and not self._retry and len(self.store) + len(self._active) >= self.cfg.budget:
                    break
                if lane is not None and job is not None:
                    seq = self._mark_sent(job, lane, time.monotonic())  # building the job may have taken a while
                    t = asyncio.create_task(self._send(job, lane, seq))
                    tasks.add(t)
                    t.add_done_callback(tasks.discard)
                    await asyncio.sleep(0)  # let the request start before the next job is built
                    continue
                timeout = wait
                if self._retry and self._retry[0][0] > now:  # a due retry waits for a lane, like a new query
                    r = self._retry[0][0] - now
                    timeout = r if timeout is None else min(timeout, r)
                if lane is not None and job is None and not self._retry:
                    timeout = None  # budget covered: wait for outstanding answers
                if timeout is None and not busy:
                    timeout = 0.05
                self._wake.clear()  # no await since the state was read: no wake-up can be lost
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=None if timeout is None else min(timeout, 1.0))
        except asyncio.CancelledError:
            for t in tasks:
                t.cancel()
            raise
        finally:
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
        if self.fatal is not None:
            raise self.fatal

    def _mark_sent(self, job: _Job, lane: _Lane, now: float) -> int:
        """Book ``job`` as sent on ``lane`` at ``now``; returns the pacer's sequence number."""
        job.sent_at = now
        lane.sent += 1
        lane.last_sent = now
        self.stats.sent += 1
        self.stats.first_send = self.stats.first_send or now
        return lane.pacer.on_send(now)

    async def _send(self, job: _Job, lane: _Lane, seq: int) -> None:
        try:
            out = await self.client.translate(self.cfg.model, lane.key, job.png)
            now = time.monotonic()
            lane.pacer.on_response(seq, now, out.status, out.code, out.headers)
            self._log(job, lane, out)
            self._handle(job, lane, out, now)
        except asyncio.CancelledError:
            lane.pacer.on_response(seq, time.monotonic(), None, "cancelled", RateHeaders())
            raise
        except BaseException as exc:  # noqa: BLE001 - stored and re-raised by the loop
            if self.fatal is None:
                self.fatal = exc
        finally:
            self._wake.set()

    def _log(self, job: _Job, lane: _Lane, out: Outcome) -> None:
        h = out.headers
        rec = {
            "t": round(time.time(), 4), "session": self._session, "query_index": job.query.index,
            "attempt": job.attempts, "key": lane.label, "status": out.status, "code": out.code,
            "latency_ms": round(out.latency_s * 1000, 2), "retry_after": h.retry_after_s, "limit": h.limit,
            "remaining": h.remaining, "reset": h.reset_s, "quota_remaining": h.quota_remaining,
            "request_id": out.request_id,
        }
        if out.error:
            rec["error"] = out.error
        elif out.status and out.status >= 400 and out.detail:
            rec["detail"] = out.detail[:200]
        self.log_file.append({k: v for k, v in rec.items() if v is not None})

    def _fail_attempt(self, job: _Job, what: str, now: float, retry_after: float | None, transport: bool,
                      pause: bool = True) -> None:
        """A 5xx/transport failure: back off and retry, or stop the run after too many.

        With ``pause`` (the victim failed, not just this answer) no query at all goes before the failed one
        may go again, so ``storm_limit`` failures in a row take the backoff schedule, not milliseconds, and
        a victim that restarts within it finds the harvest still running. A failure counts towards
        ``storm_limit`` only when its query was sent after the previous failure: the queries already in
        flight when the victim went down (up to ``max_concurrency`` per key) fail as one event.
        """
        job.attempts += 1
        self.stats.retries += 1
        if job.sent_at >= self._last_failure:
            self._consecutive_failures += 1
        self._last_failure = max(self._last_failure, now)
        c = self.cfg.client
        if job.attempts > c.max_retries or self._consecutive_failures >= c.storm_limit:
            many = (f"{self._consecutive_failures} failures in a row" if self._consecutive_failures >= c.storm_limit
                    else f"query {job.query.index} failed {job.attempts} times")
            err = VictimUnreachableError if transport else VictimFailingError
            raise err(f"the victim at {self.url} keeps failing ({many}; last: {what}); pairs so far are kept, "
                      "re-run the same command to resume")
        # the shared full-jitter backoff; a Retry-After is honoured in full (the run is paused, not a caller)
        not_before = now + retry_wait(c, job.attempts, retry_after, cap_s=math.inf)
        self._requeue(job, not_before)
        if pause:
            self._pause_until = max(self._pause_until, not_before)

    def _handle(self, job: _Job, lane: _Lane, out: Outcome, now: float) -> None:
        st = self.stats
        st.last_answer = now
        st.statuses[str(out.status) if out.status is not None else "transport"] += 1
        st.latency_sum += out.latency_s
        h = out.headers
        if h.quota_remaining is not None:
            lane.quota_remaining = h.quota_remaining
            self._check_quota()
        if st.saturated_at is None and (out.status == 429 or (h.remaining == 0 and out.ok)):
            st.saturated_at = now
        q = job.query
        if out.status is None:
            st.transport_errors += 1
            self._fail_attempt(job, out.error or "transport error", now, None, transport=True)
            return
        if out.ok:
            self._store_pair(job, lane, out)
            return
        s, code = out.status, out.code or ""
        if s == 429 and code == "quota_exhausted":
            st.quota_refusals += 1
            if lane.state == "active":
                lane.state = "exhausted"
                lane.quota_retry_after_s = h.retry_after_s
                when = f" (resets in {h.retry_after_s:.0f} s)" if h.retry_after_s else ""
                log.warning("key %s: quota exhausted%s; %d key(s) left", lane.label, when, len(self._live_lanes()))
            self._requeue(job, now)
            return
        if s == 429:
            st.rate_limited += 1
            self._requeue(job, now)
            return
        if s in (401, 403):
            if not lane.ever_ok:
                raise UnauthorizedError(f"the victim refused API key {lane.label} (…{lane.key[-4:]}): {s} "
                                        f"{code or 'unauthorized'}: {out.detail or 'check --api-key'}")
            lane.state = "revoked"
            log.warning("key %s was refused (%s %s) after it worked: revoked or banned; %d key(s) left",
                        lane.label, s, code, len(self._live_lanes()))
            self._requeue(job, now)
            return
        if s == 404:
            raise UnknownModelError(f"the victim answered 404 {code or ''} for model {self.cfg.model!r}: "
                                    f"{out.detail}".strip())
        if s >= 500:
            self._fail_attempt(job, f"{s} {code}".strip(), now, h.retry_after_s, transport=False)
            return
        if 400 <= s < 500 and (code in IMAGE_REFUSALS or s in (400, 413, 415, 422)):
            self._consecutive_failures = 0
            self._active.pop(q.index, None)
            self._record_refusal(q, code or f"http_{s}", out.detail)
            return
        raise VictimProtocolError(f"the victim answered {s} {code} ({out.detail}); the attacker cannot go on")

    def _check_quota(self) -> None:
        if self._quota_warned or any(ln.quota_remaining is None for ln in self._live_lanes()):
            return
        self._quota_warned = True
        left = sum(ln.quota_remaining or 0 for ln in self._live_lanes())
        need = self.cfg.budget - len(self.store) - len(self._active)
        if left < need:
            log.warning("the keys have %d queries of quota left but %d more pairs are wanted: the harvest will "
                        "stop early", left, need)

    def _store_pair(self, job: _Job, lane: _Lane, out: Outcome) -> None:
        q = job.query
        try:
            y = decode_image(out.body, _DECODE_LIMITS)
        except ImageError as exc:
            self._fail_attempt(job, f"answer is not an image ({exc})", time.monotonic(), None, transport=False,
                               pause=False)
            return
        self._consecutive_failures = 0
        self._pause_until = 0.0  # the victim answers again
        h, w = q.image.shape[-2:]
        oh, ow = y.shape[-2:]
        if (oh, ow) != (h * self.info.scale, w * self.info.scale) and not self._scale_warned:
            self._scale_warned = True
            log.warning("output %dx%d for input %dx%d does not match the published scale %d", ow, oh, w, h,
                        self.info.scale)
        rec = self.store.add_pair(
            q.index, job.png, out.body, source=q.source, crop=q.crop,
            output_media_type=out.content_type or "image/png", in_hw=[int(h), int(w)], out_hw=[int(oh), int(ow)],
            key=lane.label, request_id=out.request_id, latency_ms=round(out.latency_s * 1000, 2),
            transform=q.transform,
        )
        self._active.pop(q.index, None)
        self._ok_pixels += int(h * w)
        lane.ok += 1
        lane.ever_ok = True
        self.stats.ok += 1
        if self.stats.saturated_at is not None and job.sent_at >= self.stats.saturated_at:
            self.stats.ok_after_saturation += 1  # the burst's answers still in flight at saturation do not count
        if self.strategy.adaptive:
            x = q.image
            self.strategy.observe(rec.query_index, x, y)
        self.progress.advance("harvest", 1, self._info_line())

    # --- reporting -----------------------------------------------------------------------------------
    def _rates(self) -> dict[str, float | None]:
        st = self.stats
        end = st.last_answer or time.monotonic()
        active = (end - st.first_send) if st.first_send else 0.0
        achieved = st.ok / active if active > 0 else None
        steady = None
        if st.saturated_at is not None and end - st.saturated_at > 0.5 and st.ok_after_saturation >= 3:
            steady = st.ok_after_saturation / (end - st.saturated_at)
        rates = [ln.pacer.rate() for ln in self.lanes if ln.pacer.headers_seen]
        allowed = sum(r for r in rates if r) if rates and all(rates) else None
        return {"active_s": active, "achieved_rate": achieved, "steady_rate": steady, "allowed_rate_estimate": allowed,
                "rate_ratio": (steady or achieved) / allowed if allowed and (steady or achieved) else None}

    def _info_line(self) -> str:
        r = self._rates()
        rate = r["steady_rate"] or r["achieved_rate"]
        allowed = r["allowed_rate_estimate"]
        s = f"{rate:.2f}/s" if rate else "-/s"
        if allowed:
            s += f" (limit ~{allowed:.2f}/s)"
        return f"{s} · 429s {self.stats.rate_limited} · retries {self.stats.retries}"

    def _write_run(self, status: str, error: str | None = None) -> dict[str, Any]:
        self._last_run_json = time.monotonic()
        st = self.stats
        r = self._rates()
        wall = time.monotonic() - st.started
        session = {
            "session": self._session, "status": status, "started": time.time() - wall, "wall_s": round(wall, 3),
            "queries_sent": st.sent, "pairs_added": len(self.store) - self._prior_pairs,
            "responses": dict(st.statuses), "rate_limited_429": st.rate_limited, "quota_429": st.quota_refusals,
            "retries": st.retries, "refused": st.refused, "refused_locally": st.refused_locally,
            "transport_errors": st.transport_errors,
            "wasted_429_per_100": round(100 * st.rate_limited / st.sent, 3) if st.sent else 0.0,
            "mean_latency_ms": round(1000 * st.latency_sum / max(1, sum(st.statuses.values())), 2),
            **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()},
            "keys": [{"label": ln.label, "fingerprint": _key_fingerprint(ln.key), "state": ln.state, "sent": ln.sent,
                      "pairs": ln.ok, "quota_remaining": ln.quota_remaining,
                      "rate_limit_burst": ln.pacer.limit, "rate_estimate": ln.pacer.rate()} for ln in self.lanes],
        }
        if error:
            session["error"] = error
        prev = read_run(self.run_dir).get("harvest", {})
        sessions = [s for s in prev.get("sessions", []) if s.get("session") != self._session] + [session]
        totals = Counter[str]()
        for s in sessions:
            totals.update(s.get("responses", {}))
        sent_total = sum(int(s.get("queries_sent", 0)) for s in sessions)
        limited_total = sum(int(s.get("rate_limited_429", 0)) for s in sessions)
        harvest_section = {
            "identity": self.identity, "status": status, "stop_reason": self.stop_reason if status != "complete" else
            None, "budget": self.cfg.budget, "budget_pixels": self.cfg.budget_pixels, "pairs": len(self.store),
            "refused_inputs": len(self.store.refused_records()),
            "input_pixels": sum((x.in_hw[0] * x.in_hw[1]) if x.in_hw else 0 for x in self.store.ok_records()),
            "queries_sent": sent_total, "responses": dict(totals), "rate_limited_429": limited_total,
            "wasted_429_per_100": round(100 * limited_total / sent_total, 3) if sent_total else 0.0,
            "wall_s": round(sum(float(s.get("wall_s", 0.0)) for s in sessions), 3),
            "achieved_rate": session["achieved_rate"], "steady_rate": session["steady_rate"],
            "allowed_rate_estimate": session["allowed_rate_estimate"], "rate_ratio": session["rate_ratio"],
            "strategy": {"name": self.cfg.strategy, **self.strategy.describe()},
            "sessions": sessions,
        }
        target = {"url": self.url, "model": self.cfg.model, "info": self.info.model_dump(exclude_none=True)}
        update_run(self.run_dir, target=target, harvest=harvest_section)
        return harvest_section


def _session_from_log(session: dict[str, Any], lines: list[dict[str, Any]],
                      stored: dict[int, str | None]) -> dict[str, Any]:
    """``session`` (a dead one from ``run.json``) with its counts rebuilt from its ``harvest_log.jsonl`` lines.

    ``stored`` maps the query index of every stored pair to its request id: a 2xx line is a pair this
    session added when the pair store holds that answer (the same request id when both are known).
    """
    statuses = Counter(str(r.get("status")) if r.get("status") is not None else "transport" for r in lines)
    sent = len(lines)
    limited = sum(1 for r in lines if r.get("status") == 429 and r.get("code") != "quota_exhausted")
    failed = sum(1 for r in lines if r.get("status") is None or r["status"] >= 500)
    refused = sum(1 for r in lines if isinstance(r.get("status"), int) and 400 <= r["status"] < 500
                  and r["status"] not in (401, 403, 404, 429))

    def added(r: dict[str, Any]) -> bool:
        i, rid = r.get("query_index"), r.get("request_id")
        return (isinstance(r.get("status"), int) and 200 <= r["status"] < 300 and i in stored
                and (stored[i] is None or rid is None or stored[i] == rid))

    pairs = [r for r in lines if added(r)]
    keys = []
    for k in session.get("keys", []):
        mine = [r for r in lines if r.get("key") == k.get("label")]
        keys.append({**k, "sent": len(mine), "pairs": sum(1 for r in pairs if r.get("key") == k.get("label"))})
    started = float(session.get("started", 0.0))
    last = max((float(r.get("t", 0.0)) for r in lines), default=0.0)
    return {
        **session, "status": "killed", "queries_sent": sent, "pairs_added": len(pairs), "responses": dict(statuses),
        "rate_limited_429": limited, "quota_429": statuses["429"] - limited, "retries": failed,
        "refused": refused, "transport_errors": statuses["transport"],
        "wasted_429_per_100": round(100 * limited / sent, 3) if sent else 0.0,
        "mean_latency_ms": round(sum(float(r.get("latency_ms", 0.0)) for r in lines) / max(1, sent), 2),
        "wall_s": round(max(float(session.get("wall_s", 0.0)), last - started if started else 0.0), 3),
        "keys": keys,
        "error": "the process ended without updating run.json (kill -9, crash or power loss); counts rebuilt "
                 "from harvest_log.jsonl",
    }


async def harvest_async(
    url: str,
    api_keys: str | Sequence[str],
    model: str,
    out: str | Path,
    *,
    images: str | Sequence[NamedImage] | Sequence[torch.Tensor] = "corpus:attacker",
    strategy: str = "crops",
    strategy_params: dict[str, Any] | None = None,
    budget: int = 100,
    budget_pixels: int | None = None,
    seed: int = 0,
    max_rate: float | None = None,
    client: ClientConfig | dict[str, Any] | None = None,
    max_refused: int | None = None,
    durable: bool = True,
    progress: ProgressHook | None = None,
) -> HarvestResult:
    """Async version of :func:`harvest` (the blocking twin, same arguments)."""
    keys = [api_keys] if isinstance(api_keys, str) else list(api_keys)
    try:
        cfg = HarvestConfig(
            url=url, api_keys=keys, model=model, out=Path(out), strategy=strategy,
            strategy_params=strategy_params or {}, budget=budget, budget_pixels=budget_pixels, seed=seed,
            max_rate=max_rate, client=client if isinstance(client, ClientConfig) else ClientConfig(**(client or {})),
            max_refused=max_refused, durable=durable,
        )
    except ValidationError as exc:
        raise ConfigError(f"bad harvest option {first_problem(exc)}") from None
    check_out_folder(cfg.out)  # before anything is sent
    if not isinstance(images, str):
        images = [im if isinstance(im, NamedImage) else NamedImage(f"image{i:04d}", im) for i, im in enumerate(images)]
    return await Harvester(cfg, images, progress or NO_PROGRESS).run()


def _blocking(fn: Callable[P, Coroutine[Any, Any, T]]) -> Callable[P, T]:
    """The blocking twin of a coroutine function: same (typed) arguments, run with :func:`asyncio.run`."""

    @functools.wraps(fn)
    def run(*args: P.args, **kwargs: P.kwargs) -> T:
        return asyncio.run(fn(*args, **kwargs))

    return run


harvest = _blocking(harvest_async)
harvest.__doc__ = """Harvest ``budget`` (input, output) pairs from ``model`` at ``url`` into the run folder ``out``.

    Resumes when ``out`` already holds a harvest with the same model, strategy, parameters, seed and
    images. ``images``: ``corpus:SPLIT``, a folder, or a list of :class:`~translators.corpus.NamedImage` /
    ``(1, 3, H, W)`` tensors; ``strategy``: ``random``, ``crops``, ``tiles``, ``augment``, ``diversity``,
    ``interleave``, ``novel``; ``strategy_params``: see :class:`~attacker.strategies.StrategyParams`;
    ``budget`` in pairs, ``budget_pixels`` in input pixels; ``max_rate``: requests/s per key at most;
    ``client``: :class:`ClientConfig` or its fields; ``max_refused``: refusals tolerated; ``durable``: fsync
    every pair.

    Returns a :class:`HarvestResult` (``status`` ``complete`` or ``stopped`` when every key's quota ran
    out or the pixel budget was spent). Raises an :class:`~attacker.errors.AttackError` subclass when
    the run cannot go on (see the module docstring for the policy); pairs written so far are kept.
    """

__all__ = ["AttackError", "HarvestConfig", "HarvestResult", "harvest", "harvest_async"]
