"""The escalation-level store: shared through real Redis across instances, cached reads, fail-safe."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from victim_service.levels import LevelError, MemoryLevelStore, RedisLevelStore


def test_memory_store_sets_and_reads() -> None:
    async def go() -> None:
        s = MemoryLevelStore()
        assert await s.get("alice") == 0
        rec = await s.set("alice", 2, reason="knn", source="monitor")
        assert rec.level == 2
        assert await s.get("alice") == 2
        assert (await s.all())["alice"].source == "monitor"
        with pytest.raises(LevelError):
            await s.set("alice", -1)

    asyncio.run(go())


def test_redis_store_is_shared_between_instances(redis_url: str, key_prefix: str) -> None:
    async def go() -> None:
        r1, r2 = aioredis.Redis.from_url(redis_url), aioredis.Redis.from_url(redis_url)
        try:
            writer = RedisLevelStore(r1, key_prefix, cache_s=0.0)
            reader = RedisLevelStore(r2, key_prefix, cache_s=0.0)
            assert await reader.get("bob") == 0
            await writer.set("bob", 3, reason="admin says so")
            assert await reader.get("bob") == 3
            rec = await reader.record("bob")
            assert rec is not None
            assert rec.reason == "admin says so"
            assert set(await reader.all()) == {"bob"}
        finally:
            await r1.aclose()
            await r2.aclose()

    asyncio.run(go())


def test_redis_store_caches_and_falls_back_when_redis_is_gone(private_redis) -> None:  # type: ignore[no-untyped-def]
    async def go() -> None:
        r = aioredis.Redis.from_url(private_redis.url, socket_timeout=0.3, socket_connect_timeout=0.3)
        try:
            s = RedisLevelStore(r, "lv:", cache_s=0.0, fail_safe_level=1)
            await s.set("carol", 2)
            assert await s.get("carol") == 2
            private_redis.stop()
            assert await s.get("carol") == 2  # last known level
            assert await s.get("dave") == 1  # never seen: the fail-safe level
            assert s.failures == 2
        finally:
            await r.aclose()

    asyncio.run(go())
