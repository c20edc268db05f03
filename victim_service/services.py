"""Everything one app instance holds (built in the lifespan, never at import): the parts behind the routes."""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis.asyncio as aioredis
import torch
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from translators.errors import HeistError
from translators.files import create_exclusive
from victim_service.batching import ModelHost
from victim_service.codecpool import CodecPool
from victim_service.errors import BackendUnavailableError
from victim_service.keys import Client, KeyResolver
from victim_service.levels import FileLevelStore, LevelStore, MemoryLevelStore, RedisLevelStore
from victim_service.metrics import Metrics
from victim_service.monitor import QueryMonitor
from victim_service.querylog import QueryLog
from victim_service.ratelimit import Decision, Limiter, MemoryLimiter, RedisLimiter
from victim_service.settings import Settings, TierSpec

log = logging.getLogger("heist.victim")
READY_DIR_ENV = "HEIST_VICTIM_READY_DIR"
"""When set, each worker touches ``$HEIST_VICTIM_READY_DIR/<pid>`` once it serves (see ``process.py``)."""


def make_redis(settings: Settings) -> aioredis.Redis:
    """Async Redis client: short timeouts and one immediate retry (a pooled connection that went stale
    after a Redis restart is replaced once; a Redis that is down fails fast into a 503)."""
    if settings.redis_url is None:
        raise ValueError("no redis_url")
    t = settings.redis_timeout_s
    return aioredis.Redis.from_url(
        settings.redis_url, socket_timeout=t, socket_connect_timeout=t, retry=Retry(NoBackoff(), 1),
        health_check_interval=30, max_connections=256,
    )


def secret_from_text(raw: bytes, source: str = "the defense secret") -> int:
    """The 64-bit defense secret derived from its text (the settings value, or a secret file's stripped contents).

    Raises :class:`HeistError` naming ``source`` when the text is empty: every empty secret would key the
    same watermarks, so an empty file is a mistake (a truncated copy), never a secret."""
    if not raw.strip():
        raise HeistError(f"{source} is empty; it must hold the server's secret")
    return int.from_bytes(hashlib.sha256(raw).digest()[:8], "big")


def defense_secret_path(settings: Settings) -> Path:
    """Where the server keeps its generated defense secret (when the settings give none)."""
    return settings.state_dir() / "defense-secret"


def read_defense_secret(settings: Settings) -> int | None:
    """The server's defense secret without creating one: from the settings, else the data-dir file, else None."""
    if settings.defense_secret is not None:
        return secret_from_text(settings.defense_secret.get_secret_value().encode())
    path = defense_secret_path(settings)
    return secret_from_text(path.read_bytes().strip(), f"the defense-secret file {path}") if path.exists() else None


def defense_secret(settings: Settings) -> int:
    """The secret keying defense randomness: from the settings, else a random one kept in the data dir.

    Several workers race to create the file; exactly one wins (:func:`translators.files.create_exclusive`),
    the others read it.
    """
    if settings.defense_secret is not None:
        return secret_from_text(settings.defense_secret.get_secret_value().encode())
    path = defense_secret_path(settings)
    if not path.exists():
        create_exclusive(path, secrets.token_hex(32).encode(), mode=0o600)
    return secret_from_text(path.read_bytes().strip(), f"the defense-secret file {path}")


@dataclass
class Services:
    """The app's parts. ``ready`` flips once every model is loaded and warmed up."""

    settings: Settings
    metrics: Metrics
    redis: aioredis.Redis | None
    limiter: Limiter
    keys: KeyResolver
    log: QueryLog
    host: ModelHost
    secret: int
    levels: LevelStore = field(default_factory=MemoryLevelStore)
    codecs: CodecPool | None = None  # set by start(); request decode/encode run on its threads
    monitor: QueryMonitor | None = None
    ready: bool = False
    started: float = field(default_factory=time.time)
    _ready_file: Path | None = None
    _last_open_warning: float = 0.0

    @classmethod
    async def start(cls, settings: Settings) -> Services:
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        metrics = Metrics()
        r = make_redis(settings) if settings.redis_url else None
        limiter: Limiter = RedisLimiter(r, settings.key_prefix) if r is not None else MemoryLimiter()
        if r is not None and not await limiter.ping():
            log.warning("Redis at %s is not answering; requests get 503 until it does", settings.redis_url)
        qlog = QueryLog(settings, r)
        qlog.start()
        host = ModelHost(settings, metrics)
        levels: LevelStore = (RedisLevelStore(r, settings.key_prefix) if r is not None
                              else FileLevelStore(settings.state_dir() / "levels.json"))
        codecs = CodecPool(settings.output, settings.codec_threads)
        levels.fail_safe_level = settings.monitor.fail_safe_level
        svc = cls(
            settings, metrics, r, limiter, KeyResolver(settings, r), qlog, host, defense_secret(settings), levels,
            codecs,
        )
        try:
            await host.start()
            for m in host.models.values():
                await host.workers[str(m.device)].run_in_thread(codecs.enable_gpu_jpeg, m.device)
        except BaseException:
            await svc.close()
            raise
        if QueryMonitor.wanted(settings):
            svc.monitor = QueryMonitor(settings, r, levels, metrics)
            svc.monitor.start()
        svc.ready = True
        ready_dir = os.environ.get(READY_DIR_ENV)
        if ready_dir:
            svc._ready_file = Path(ready_dir) / str(os.getpid())
            svc._ready_file.write_text(str(time.time()))
        log.info("victim service ready: %d model(s), limiter=%s, query log=%s, %d codec threads, workers pid %d",
                 len(host.models), limiter.backend, qlog.backend, codecs.threads, os.getpid())
        return svc

    async def close(self) -> None:
        self.ready = False
        if self._ready_file is not None:
            self._ready_file.unlink(missing_ok=True)
        if self.monitor is not None:
            await self.monitor.close()
        await self.host.close()
        if self.codecs is not None:
            self.codecs.close()
        await self.log.close()
        if self.redis is not None:
            await self.redis.aclose()

    async def authenticate(self, key: str) -> Client | None:
        try:
            return await self.keys.resolve(key)
        except BackendUnavailableError:
            self.metrics.backend_errors.labels("keys").inc()
            raise

    async def decide(self, client: Client, tier: TierSpec) -> Decision:
        """The limiter's decision; with ``on_redis_error = "open"`` an unreachable Redis admits the request."""
        if tier.unlimited:
            return Decision(allowed=True)
        t0 = time.perf_counter()
        try:
            d = await self.limiter.check(client.name, tier)
        except BackendUnavailableError:
            self.metrics.backend_errors.labels("limiter").inc()
            if self.settings.on_redis_error == "open":
                now = time.monotonic()
                if now - self._last_open_warning > 10:
                    self._last_open_warning = now
                    log.warning("Redis unreachable: admitting requests without limits (on_redis_error = open)")
                return Decision(allowed=True)
            raise
        self.metrics.limiter.observe(time.perf_counter() - t0)
        return d

    async def redis_ok(self) -> bool | None:
        """None without Redis; else whether it answers a PING."""
        if self.redis is None:
            return None
        return await self.limiter.ping()
