"""Per-client escalation levels: written by the query monitor or an admin, read on every request.

A client's *level* selects its defense pipeline (level 0 = its tier's pipeline; higher levels add or
strengthen defenses, see the defense policy). Writers (the monitor, ``POST /v1/admin/clients/{name}/level``)
call :meth:`LevelStore.set`; the request path calls :meth:`LevelStore.get`, which answers from a small
per-process cache (``cache_s`` seconds) so a request costs at most one Redis round trip per client and
``cache_s``, and none in the steady state.

Storage follows the settings like the key store: with Redis, the hash ``{prefix}levels`` (client ->
JSON :class:`LevelRecord`) shared by every worker and replica; without Redis, ``DATA/victim/levels.json``
(one worker only; written atomically at each change, read back at start-up, so an admin's decision
survives a restart); :class:`MemoryLevelStore` keeps them in the process only (tests, embedding).

An admin's record is final for the monitor's *replays* (a Redis take-over, the JSONL log read again at
start-up): they re-apply escalations the monitor had already made, and must not undo a level an admin
set since. Escalations the monitor makes live still raise the level, as the last write.

When Redis fails, :meth:`LevelStore.get` returns the last cached level, or
``fail_safe_level`` for a client it never saw, and counts the failure (``backend_errors``); a request is
never refused because the level could not be read.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from pathlib import Path

import redis
import redis.asyncio as aioredis

from translators.errors import HeistError
from translators.files import atomic_write_json

log = logging.getLogger("heist.victim.levels")


class LevelError(HeistError):
    """A level that cannot be set (negative, above the highest configured level, ...)."""

    code = "bad_level"


@dataclass(frozen=True)
class LevelRecord:
    """A client's level and why it was set: ``source`` is ``"admin"`` or ``"monitor"``; ``set_at`` Unix s."""

    client: str
    level: int
    reason: str = ""
    source: str = "admin"
    set_at: float = 0.0

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: str | bytes) -> LevelRecord:
        d = json.loads(raw)
        return cls(str(d["client"]), int(d["level"]), str(d.get("reason", "")), str(d.get("source", "admin")),
                   float(d.get("set_at", 0.0)))


class LevelStore(ABC):
    """Async store of :class:`LevelRecord` with a cached read path."""

    backend: str = "memory"

    def __init__(self, cache_s: float = 1.0, fail_safe_level: int = 0) -> None:
        self.cache_s = cache_s
        self.fail_safe_level = fail_safe_level
        self.failures = 0
        self._cache: dict[str, tuple[float, int]] = {}

    async def get(self, client: str) -> int:
        """The client's level (0 when never set), from the cache when fresher than ``cache_s``."""
        now = time.monotonic()
        hit = self._cache.get(client)
        if hit is not None and now - hit[0] < self.cache_s:
            return hit[1]
        try:
            rec = await self.record(client)
        except (redis.RedisError, OSError) as exc:
            self.failures += 1
            log.warning("level store unreachable (%s): client %s keeps level %s", exc, client,
                        hit[1] if hit else self.fail_safe_level)
            return hit[1] if hit is not None else self.fail_safe_level
        level = rec.level if rec is not None else 0
        self._cache[client] = (now, level)
        return level

    async def set(self, client: str, level: int, *, reason: str = "", source: str = "admin") -> LevelRecord:
        """Store ``level`` for ``client`` (visible to other workers within their ``cache_s``)."""
        if level < 0:
            raise LevelError(f"level must be >= 0, got {level}")
        rec = LevelRecord(client, int(level), reason, source, time.time())
        await self._write(rec)
        self._cache[client] = (time.monotonic(), rec.level)
        return rec

    @abstractmethod
    async def record(self, client: str) -> LevelRecord | None:
        """The stored record (uncached), or None."""

    @abstractmethod
    async def all(self) -> dict[str, LevelRecord]:
        """Every stored record by client."""

    @abstractmethod
    async def _write(self, rec: LevelRecord) -> None: ...

    async def close(self) -> None:  # noqa: B027 - nothing to release by default
        """Release connections (the Redis client is owned by the caller)."""


class MemoryLevelStore(LevelStore):
    """One process's levels (the embedded default without Redis)."""

    backend = "memory"

    def __init__(self, cache_s: float = 0.0, fail_safe_level: int = 0) -> None:
        super().__init__(cache_s, fail_safe_level)
        self._records: dict[str, LevelRecord] = {}

    async def record(self, client: str) -> LevelRecord | None:
        return self._records.get(client)

    async def all(self) -> dict[str, LevelRecord]:
        return dict(self._records)

    async def _write(self, rec: LevelRecord) -> None:
        self._records[rec.client] = rec


class FileLevelStore(MemoryLevelStore):
    """Levels in a JSON file ``{client: record}`` (the embedded default without Redis): read when the store
    is made, rewritten atomically at each change (levels change rarely: escalations and admin decisions)."""

    backend = "file"

    def __init__(self, path: Path, cache_s: float = 0.0, fail_safe_level: int = 0) -> None:
        super().__init__(cache_s, fail_safe_level)
        self.path = path
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            self._records = {c: LevelRecord.from_json(json.dumps(r)) for c, r in raw.items()}
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("%s is unreadable (%s); client levels start at 0", path, exc)

    async def _write(self, rec: LevelRecord) -> None:
        self._records[rec.client] = rec
        data = {c: asdict(r) for c, r in self._records.items()}
        await asyncio.to_thread(atomic_write_json, self.path, data, False)


class RedisLevelStore(LevelStore):
    """Levels in the Redis hash ``{prefix}levels``, shared by every worker and replica."""

    backend = "redis"

    def __init__(self, r: aioredis.Redis, prefix: str, cache_s: float = 1.0, fail_safe_level: int = 0) -> None:
        super().__init__(cache_s, fail_safe_level)
        self.redis = r
        self.key = f"{prefix}levels"

    async def record(self, client: str) -> LevelRecord | None:
        raw = await self.redis.hget(self.key, client)
        return LevelRecord.from_json(raw) if raw else None

    async def all(self) -> dict[str, LevelRecord]:
        raw = await self.redis.hgetall(self.key)
        out: dict[str, LevelRecord] = {}
        for v in raw.values():
            rec = LevelRecord.from_json(v)
            out[rec.client] = rec
        return out

    async def _write(self, rec: LevelRecord) -> None:
        await self.redis.hset(self.key, rec.client, rec.to_json())
