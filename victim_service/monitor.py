"""The query monitor inside the service: reads the query log, scores clients, raises escalation levels.

It runs as a background task of every worker and never touches the translate path: requests only read the
cached level (:class:`~victim_service.levels.LevelStore`), the monitor reads the log after the fact.

* **Redis** (query log on a Redis Stream): the stream's consumer group ``monitor``. One worker at a time
  holds the lease ``{prefix}monitor:lease`` (renewed every round, ``lease_s``) and scores; the others wait
  to take over, so per-client state has one writer. Per-client state (:class:`~defenses.monitor.scoring.
  ClientState`) lives in the hash ``{prefix}monitor:clients``, written in the same ``MULTI`` as the
  ``XACK`` of the entries that produced it: after a crash, unacknowledged entries are read again from the
  group's pending list and every client skips entries at or before its ``last_seq``, so nothing is lost
  or counted twice. Levels are written through the level store (reconciled with the states on take-over).
* **JSONL** (embedded mode, one process): the log file is replayed from its start when the service starts
  (rebuilding the same state, so a restart neither loses nor double-counts) and then tailed.

Failures (Redis unreachable, a bug) set the gauge ``heist_monitor_up`` to 0 and count
``heist_monitor_errors_total``; the loop retries with backoff while requests go on at their cached level
(or ``fail_safe_level``). Malformed entries are acknowledged, skipped and counted
(``heist_monitor_malformed_total``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import uuid
from pathlib import Path
from typing import Any

import redis
import redis.asyncio as aioredis
from prometheus_client import Counter, Gauge

from defenses.monitor.config import MonitorConfig
from defenses.monitor.engine import LevelChange, MalformedEntryError, MonitorEngine, observation_from_entry
from defenses.monitor.scoring import ClientState
from victim_service.errors import redis_unavailable
from victim_service.levels import LevelStore
from victim_service.metrics import Metrics
from victim_service.querylog import STREAM_FIELD, backend_of, jsonl_path, stream_key
from victim_service.settings import Settings

log = logging.getLogger("heist.victim.monitor")
GROUP = "monitor"
CONSUMER = "monitor"  # one lease holder at a time, so one consumer name owns the pending list
_RENEW = """if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end
return redis.call('set', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) and 1 or 0"""


class MonitorMetrics:
    """The monitor's Prometheus series, registered on the app's registry."""

    def __init__(self, metrics: Metrics) -> None:
        r = metrics.registry
        self.up = Gauge("heist_monitor_up", "1 while the query monitor consumes the log; 0 after a failure "
                        "(requests then keep their cached or fail-safe level)", multiprocess_mode="livemax",
                        registry=r)
        self.entries = Counter("heist_monitor_entries_total", "Query-log entries scored by the monitor", registry=r)
        self.malformed = Counter("heist_monitor_malformed_total", "Query-log entries skipped as malformed",
                                 registry=r)
        self.errors = Counter("heist_monitor_errors_total", "Monitor rounds that failed (Redis down, bug)",
                              registry=r)
        self.escalations = Counter("heist_monitor_escalations_total", "Client level increases by the monitor",
                                   registry=r)


def client_key(settings: Settings) -> str:
    return f"{settings.key_prefix}monitor:clients"


class QueryMonitor:
    """Background consumer; :meth:`start` in the lifespan, :meth:`close` at shutdown."""

    def __init__(self, settings: Settings, r: aioredis.Redis | None, levels: LevelStore, metrics: Metrics) -> None:
        self.settings = settings
        self.config: MonitorConfig = settings.monitor
        self.backend = "redis" if backend_of(settings) == "redis" and r is not None else "jsonl"
        self.r = r
        self.levels = levels
        self.metrics = MonitorMetrics(metrics)
        self.tier_rates = {name: t.rate for name, t in settings.tiers.items()}
        self.engine: MonitorEngine | None = None
        self.stream = stream_key(settings)
        self.clients_key = client_key(settings)
        self.lease_key = f"{settings.key_prefix}monitor:lease"
        self.token = f"{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.path: Path = jsonl_path(settings)
        self._offset = 0
        self._line = 0
        self._replay_end = 0  # JSONL: log bytes written before this process started (replayed at start-up)
        self._task: asyncio.Task[None] | None = None
        self._pending = True
        self.rounds = 0

    @classmethod
    def wanted(cls, settings: Settings) -> bool:
        """On by default whenever the query log is on."""
        return settings.monitor.enabled and backend_of(settings) != "off"

    def start(self) -> None:
        if self._task is None:
            self.metrics.up.set(1)
            self._task = asyncio.get_running_loop().create_task(self._run(), name="query-monitor")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self.r is not None and self.backend == "redis":
            with contextlib.suppress(redis.RedisError, OSError):
                if await self.r.get(self.lease_key) == self.token.encode():
                    await self.r.delete(self.lease_key)

    # ------------------------------------------------------------------------------------------ reading state

    async def states(self) -> dict[str, ClientState]:
        """Every client's state as the admin routes show it (Redis: shared by all workers). Raises
        :class:`~victim_service.errors.BackendUnavailableError` (503) when Redis cannot be reached."""
        if self.backend == "redis" and self.r is not None:
            with redis_unavailable("the monitor's state"):
                raw = await self.r.hgetall(self.clients_key)
            return {k.decode(): ClientState.from_json(v) for k, v in raw.items()}
        return dict(self.engine.clients) if self.engine is not None else {}

    async def state(self, client: str) -> ClientState | None:
        """One client's state, None if the monitor has not seen it; :class:`BackendUnavailableError` as above."""
        if self.backend == "redis" and self.r is not None:
            with redis_unavailable("the monitor's state"):
                raw = await self.r.hget(self.clients_key, client)
            return ClientState.from_json(raw) if raw else None
        return self.engine.clients.get(client) if self.engine is not None else None

    # ------------------------------------------------------------------------------------------ loop

    async def _run(self) -> None:
        backoff = 0.2
        while True:
            try:
                did = await (self._round_redis() if self.backend == "redis" else self._round_jsonl())
                self.metrics.up.set(1)
                backoff = 0.2
                if not did:
                    await asyncio.sleep(self.config.block_ms / 1000 if self.backend == "jsonl" else 0)
            except asyncio.CancelledError:
                raise
            except (redis.RedisError, OSError) as exc:
                self._fail(f"backend unreachable ({type(exc).__name__}: {exc})")
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            except Exception:
                log.exception("query monitor round failed")
                self._fail("unexpected error")
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    def _fail(self, why: str) -> None:
        self.metrics.up.set(0)
        self.metrics.errors.inc()
        if self.backend == "redis":
            self.engine = None  # reload the shared state once Redis answers again
        log.warning("query monitor: %s; requests keep their cached levels", why)

    def _new_engine(self, states: list[ClientState]) -> MonitorEngine:
        eng = MonitorEngine(self.config, self.tier_rates)
        eng.load(states)
        return eng

    def _fold(self, eng: MonitorEngine, items: list[tuple[tuple[int, int], Any]]) -> tuple[set[str], list[LevelChange],
                                                                                           int]:
        """Score ``(seq, raw JSON)`` items in order; returns changed clients, level increases, malformed count."""
        changed: set[str] = set()
        ups: list[LevelChange] = []
        bad = 0
        for seq, raw in items:
            try:
                if raw is None:
                    raise MalformedEntryError("entry trimmed from the stream")
                d = json.loads(raw)
                if not isinstance(d, dict):
                    raise MalformedEntryError("not a JSON object")
                obs = observation_from_entry(d, seq)
            except (MalformedEntryError, ValueError) as exc:
                bad += 1
                log.debug("query monitor: skipped malformed entry %s (%s)", seq, exc)
                continue
            if obs is None:
                continue
            c, u = eng.process(obs)
            changed |= c
            ups += u
        self.metrics.entries.inc(len(items) - bad)
        if bad:
            self.metrics.malformed.inc(bad)
        return changed, ups, bad

    async def _apply_levels(self, ups: list[LevelChange], replay: bool = False) -> None:
        """Store the monitor's level increases. A ``replay`` (escalations made before this process, scored
        again) leaves alone a client whose level an admin set, and a level already stored."""
        stored = await self.levels.all() if replay and ups else {}
        for u in ups:
            have = stored.get(u.client)
            if have is not None and (have.source == "admin" or have.level >= u.level):
                continue
            await self.levels.set(u.client, u.level, reason=u.reason, source="monitor")
            self.metrics.escalations.inc()
            log.info("monitor: client %s -> level %d: %s", u.client, u.level, u.reason)

    # Redis --------------------------------------------------------------------------------------------

    async def _hold_lease(self) -> bool:
        assert self.r is not None
        ms = int(self.config.lease_s * 1000)
        return bool(await self.r.eval(_RENEW, 1, self.lease_key, self.token, ms))

    async def _take_over(self) -> MonitorEngine:
        assert self.r is not None
        with contextlib.suppress(redis.ResponseError):  # BUSYGROUP: it exists already
            await self.r.xgroup_create(self.stream, GROUP, id="0", mkstream=True)
        raw = await self.r.hgetall(self.clients_key)
        states = [ClientState.from_json(v) for v in raw.values()]
        eng = self._new_engine(states)
        # a crash between the state write and the level write leaves a level to re-apply (never over an admin's)
        await self._apply_levels([LevelChange(s.client, s.level, s.risk, f"risk {s.risk:.2f} (replayed)")
                                  for s in states if s.level > 0], replay=True)
        self._pending = True
        log.info("query monitor: scoring the log (%d clients known), lease %s", len(states), self.token)
        return eng

    async def _round_redis(self) -> bool:
        assert self.r is not None
        if not await self._hold_lease():
            self.engine = None
            await asyncio.sleep(self.config.lease_s / 2)
            return True
        if self.engine is None:
            self.engine = await self._take_over()
        eng = self.engine
        if self._pending:  # entries delivered before a crash and never acknowledged
            resp = await self.r.xreadgroup(GROUP, CONSUMER, {self.stream: "0"}, count=self.config.batch)
        else:
            resp = await self.r.xreadgroup(GROUP, CONSUMER, {self.stream: ">"}, count=self.config.batch,
                                           block=self.config.block_ms)
        entries = resp[0][1] if resp else []
        if self._pending and not entries:
            self._pending = False
            return True
        if not entries:
            return False
        items: list[tuple[tuple[int, int], Any]] = []
        ids = []
        for eid, fields in entries:
            ids.append(eid)
            ms, seq = (eid.decode() if isinstance(eid, bytes) else eid).split("-")
            items.append(((int(ms), int(seq)), (fields or {}).get(STREAM_FIELD)))
        changed, ups, _bad = self._fold(eng, items)
        pipe = self.r.pipeline(transaction=True)
        if changed:
            pipe.hset(self.clients_key, mapping={c: eng.clients[c].to_json() for c in changed})
        pipe.xack(self.stream, GROUP, *ids)
        await pipe.execute()
        await self._apply_levels(ups)
        self.rounds += 1
        return True

    # JSONL --------------------------------------------------------------------------------------------

    async def _round_jsonl(self) -> bool:
        if self.engine is None:
            self.engine = self._new_engine([])
            self._offset = self._line = 0
            try:  # the log written before this process started is a replay of escalations already made
                self._replay_end = self.path.stat().st_size
            except FileNotFoundError:
                self._replay_end = 0
        replay = self._offset < self._replay_end
        lines = await asyncio.to_thread(self._read_new_lines)
        if not lines:
            return False
        items = []
        for text in lines:
            self._line += 1
            items.append(((self._line, 0), text))
        _changed, ups, _bad = self._fold(self.engine, items)
        await self._apply_levels(ups, replay=replay)
        self.rounds += 1
        return True

    def _read_new_lines(self) -> list[str]:
        """Complete lines appended since the last read (a line still being written waits for the next round)."""
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self._offset)
                data = fh.read(4 << 20)
        except FileNotFoundError:
            return []
        end = data.rfind(b"\n")
        if end < 0:
            return []
        self._offset += end + 1
        return [ln.decode("utf-8", "replace") for ln in data[: end + 1].split(b"\n") if ln.strip()]
