"""API keys: generated once, stored hashed, resolved to a client name and tier on every request.

Storage follows the settings: with ``redis_url`` the keys live in Redis (hash ``{prefix}keys``:
SHA-256 of the key -> ``{"name", "tier", "created"}``, and ``{prefix}keynames``: name -> hash); without it,
in ``DATA/victim/keys.json`` (written atomically, guarded by a file lock). ``heist keys add`` and the
server open the same store from the same settings, so a key added while the server runs is accepted at
once. Lookups are cached for ``key_cache_s`` seconds, but every worker also reads a revocation
*generation* at most once per :data:`GENERATION_CHECK_S` (Redis: the counter ``{prefix}keys:gen``, bumped
by each revocation and by ``POST /v1/admin/keys/reload``; file store: the key file's modification time)
and forgets its cached lookups when it changed, so a revoked key stops working on every worker within
about a second, whatever ``key_cache_s`` is.

Keys are 32 URL-safe characters after the ``hk_`` prefix (192 random bits), so a plain SHA-256 is the
right hash (as for GitHub or Stripe tokens): a slow password hash adds nothing against random keys.
Static keys from the settings file are held in memory (also hashed) and never written anywhere.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import secrets
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import redis
import redis.asyncio as aioredis
from pydantic import BaseModel

from translators.errors import HeistError
from translators.files import atomic_write_json, file_lock
from victim_service.errors import BackendUnavailableError, redis_unavailable
from victim_service.settings import Settings

KEY_PREFIX = "hk_"
GENERATION_CHECK_S = 1.0
"""How often (seconds) a server worker reads the store's revocation generation."""


class KeyStoreError(HeistError):
    """A key operation the user asked for cannot be done (duplicate name, unknown tier, ...)."""

    code = "bad_key"


def already_has_a_key(name: str) -> str:
    """The refusal of a second key for ``name``, with both ways to revoke the first."""
    return (f"client {name!r} already has a key; revoke it first (heist keys revoke {name} -c SERVER_SETTINGS, "
            f"or DELETE /v1/admin/clients/{name}/key with the admin key)")


def new_key() -> str:
    """A fresh API key: ``hk_`` + 32 URL-safe characters (192 bits from :mod:`secrets`)."""
    return KEY_PREFIX + secrets.token_urlsafe(24)


def hash_key(key: str) -> str:
    """Hex SHA-256 of a key: what the stores keep, and what the query log shows (first 12 digits)."""
    return hashlib.sha256(key.encode()).hexdigest()


class KeyRecord(BaseModel):
    """A stored key, without the key itself."""

    name: str
    tier: str
    created: float = 0.0


@dataclass(frozen=True)
class Client:
    """Who is calling: resolved from the presented key."""

    name: str
    tier: str
    kind: str  # "static" | "stored"


# ---------------------------------------------------------------------------------------------- stores


class KeyStore(ABC):
    """Synchronous key store for the CLI (``heist keys``) and the server's stored-key lookups."""

    @abstractmethod
    def add(self, name: str, tier: str) -> str:
        """Create a key for client ``name`` in ``tier``; returns the plaintext key (shown once)."""

    @abstractmethod
    def revoke(self, name: str) -> bool:
        """Delete the key of client ``name``; False if there was none."""

    @abstractmethod
    def records(self) -> list[KeyRecord]:
        """Every stored key's record, sorted by name."""

    @abstractmethod
    def lookup(self, key_hash: str) -> KeyRecord | None:
        """The record of the key whose SHA-256 is ``key_hash``."""

    @abstractmethod
    def bump_generation(self) -> None:
        """Tell every server worker to forget its cached lookups (within :data:`GENERATION_CHECK_S`)."""


class FileKeyStore(KeyStore):
    """Keys in a JSON file ``{"version": 1, "keys": {sha256: record}}`` (embedded mode, one machine)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._cache: tuple[int, dict[str, KeyRecord]] | None = None

    def _locked(self) -> contextlib.AbstractContextManager[None]:
        return file_lock(self.path.with_name(f".{self.path.name}.lock"))

    def _read(self) -> dict[str, KeyRecord]:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return {}
        if self._cache is not None and self._cache[0] == st.st_mtime_ns:
            return self._cache[1]
        try:
            raw = json.loads(self.path.read_text())
            keys = {h: KeyRecord.model_validate(r) for h, r in raw.get("keys", {}).items()}
        except (OSError, ValueError) as exc:
            raise HeistError(f"{self.path}: unreadable key file ({exc})") from None
        self._cache = (st.st_mtime_ns, keys)
        return keys

    def _write(self, keys: dict[str, KeyRecord]) -> None:
        data = {"version": 1, "keys": {h: r.model_dump() for h, r in keys.items()}}
        atomic_write_json(self.path, data, mode=0o600)

    def add(self, name: str, tier: str) -> str:
        with self._locked():
            keys = dict(self._read())
            if any(r.name == name for r in keys.values()):
                raise KeyStoreError(already_has_a_key(name))
            key = new_key()
            keys[hash_key(key)] = KeyRecord(name=name, tier=tier, created=time.time())
            self._write(keys)
        return key

    def revoke(self, name: str) -> bool:
        with self._locked():
            keys = dict(self._read())
            kept = {h: r for h, r in keys.items() if r.name != name}
            if len(kept) == len(keys):
                return False
            self._write(kept)
        return True

    def records(self) -> list[KeyRecord]:
        return sorted(self._read().values(), key=lambda r: r.name)

    def lookup(self, key_hash: str) -> KeyRecord | None:
        return self._read().get(key_hash)

    def generation(self) -> int | None:
        """The key file's modification time (ns), or None while there is none: every write changes it."""
        try:
            return self.path.stat().st_mtime_ns
        except FileNotFoundError:
            return None

    def bump_generation(self) -> None:
        with self._locked():
            old = self.generation()
            if old is None:
                return  # no key file: no stored key can be cached
            ns = max(time.time_ns(), old + 1)
            os.utime(self.path, ns=(ns, ns))


class RedisKeyStore(KeyStore):
    """Keys in Redis: hash ``{prefix}keys`` (sha256 -> record JSON) and ``{prefix}keynames`` (name -> sha256)."""

    def __init__(self, url: str, prefix: str, timeout_s: float = 2.0) -> None:
        self.prefix = prefix
        self.r = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)

    @property
    def keys_key(self) -> str:
        return f"{self.prefix}keys"

    @property
    def names_key(self) -> str:
        return f"{self.prefix}keynames"

    @property
    def generation_key(self) -> str:
        return generation_key(self.prefix)

    def _call(self, fn, *args):  # type: ignore[no-untyped-def]
        with redis_unavailable("the key store"):
            return fn(*args)

    def add(self, name: str, tier: str) -> str:
        key = new_key()
        h = hash_key(key)
        if not self._call(self.r.hsetnx, self.names_key, name, h):
            raise KeyStoreError(already_has_a_key(name))
        rec = KeyRecord(name=name, tier=tier, created=time.time())
        self._call(self.r.hset, self.keys_key, h, rec.model_dump_json())
        return key

    def revoke(self, name: str) -> bool:
        h = self._call(self.r.hget, self.names_key, name)
        if h is None:
            return False
        pipe = self.r.pipeline(transaction=True)
        pipe.hdel(self.keys_key, h)
        pipe.hdel(self.names_key, name)
        pipe.incr(self.generation_key)
        self._call(pipe.execute)
        return True

    def bump_generation(self) -> None:
        self._call(self.r.incr, self.generation_key)

    def records(self) -> list[KeyRecord]:
        raw = self._call(self.r.hgetall, self.keys_key)
        return sorted((KeyRecord.model_validate_json(v) for v in raw.values()), key=lambda r: r.name)

    def lookup(self, key_hash: str) -> KeyRecord | None:
        v = self._call(self.r.hget, self.keys_key, key_hash)
        return KeyRecord.model_validate_json(v) if v is not None else None


def generation_key(prefix: str) -> str:
    """The Redis counter that each revocation (and ``keys/reload``) increments."""
    return f"{prefix}keys:gen"


def open_key_store(settings: Settings) -> KeyStore:
    """The store the settings point at: Redis when ``redis_url`` is set, else the data-dir JSON file."""
    if settings.redis_url:
        return RedisKeyStore(settings.redis_url, settings.key_prefix)
    return FileKeyStore(settings.state_dir() / "keys.json")


# ---------------------------------------------------------------------------------------------- server side


class KeyResolver:
    """Resolves a presented key to a :class:`Client` for the server: static keys, then the store (cached).

    Positive lookups are cached ``cache_s`` seconds, negative ones at most 2 s (a flood of bad keys costs
    at most one store read per distinct key every 2 s). The whole cache is dropped when the store's
    revocation generation changes (read at most once per :data:`GENERATION_CHECK_S`). While the Redis
    store cannot be read, a key it resolved before keeps its (expired) cached client, so that
    ``on_redis_error = "open"`` goes on admitting known customers for the whole outage; an unknown key
    raises :class:`BackendUnavailableError`.
    """

    def __init__(self, settings: Settings, aredis: aioredis.Redis | None) -> None:
        self.tiers = set(settings.tiers)
        self.static = {hash_key(k.key.get_secret_value()): Client(k.name, k.tier, "static") for k in settings.keys}
        self.admin_hash = hash_key(settings.admin_key.get_secret_value()) if settings.admin_key else None
        self.cache_s = settings.key_cache_s
        self._aredis = aredis
        self._keys_key = f"{settings.key_prefix}keys"
        self._gen_key = generation_key(settings.key_prefix)
        self._file = None if aredis is not None else FileKeyStore(settings.state_dir() / "keys.json")
        self._cache: dict[str, tuple[float, Client | None]] = {}
        self._generation: object = None
        self._generation_read_at = -float("inf")

    def is_admin(self, key: str | None) -> bool:
        return bool(key and self.admin_hash and hmac.compare_digest(hash_key(key), self.admin_hash))

    async def reload(self) -> int:
        """Forget cached lookups here, and bump the generation so that every other worker does too.

        Returns how many entries this worker dropped.
        """
        if self._file is not None:
            self._file.bump_generation()
        elif self._aredis is not None:
            with redis_unavailable("the key store"):
                await self._aredis.incr(self._gen_key)
        n = len(self._cache)
        self._cache.clear()
        return n

    async def _read_generation(self) -> object:
        if self._file is not None:
            return self._file.generation()
        if self._aredis is None:
            return None
        with redis_unavailable("the key store"):
            return await self._aredis.get(self._gen_key)

    async def _sync_generation(self, now: float) -> None:
        """Drop the cache when the store's generation moved since the last reading (at most once a second)."""
        if now - self._generation_read_at < GENERATION_CHECK_S:
            return
        self._generation_read_at = now
        try:
            generation = await self._read_generation()
        except BackendUnavailableError:
            return  # keep the cache through an outage (see the class docstring)
        if generation != self._generation:
            self._cache.clear()
            self._generation = generation

    async def resolve(self, key: str) -> Client | None:
        h = hash_key(key)
        client = self.static.get(h)
        if client is not None:
            return client
        now = time.monotonic()
        await self._sync_generation(now)
        hit = self._cache.get(h)
        if hit is not None and hit[0] > now:
            return hit[1]
        try:
            record = await self._lookup(h)
        except BackendUnavailableError:
            if hit is None or hit[1] is None:
                raise
            return hit[1]  # the store is down: a key it vouched for earlier keeps its client until it is back
        client = Client(record.name, record.tier, "stored") if record is not None else None
        ttl = self.cache_s if client is not None else min(self.cache_s, 2.0)
        if len(self._cache) > 100_000:
            self._cache.clear()
        self._cache[h] = (now + ttl, client)
        return client

    async def _lookup(self, key_hash: str) -> KeyRecord | None:
        if self._file is not None:
            return self._file.lookup(key_hash)
        if self._aredis is None:
            return None
        with redis_unavailable("the key store"):
            v = await self._aredis.hget(self._keys_key, key_hash)
        return KeyRecord.model_validate_json(v) if v is not None else None
