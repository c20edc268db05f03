"""Rate limits and quotas: the Lua/Redis and in-process limiters agree, limits are exact across two
uvicorn workers sharing Redis, quotas run out, Retry-After is honest, Redis going away gives 503 (or
admits, fail-open) and the service recovers when it comes back; /metrics sums both workers."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
import redis.asyncio as aioredis

from tests.servers import VictimServer, image_bytes, start_victim, tiny_models
from victim_service.querylog import LogReader
from victim_service.ratelimit import Decision, MemoryLimiter, RedisLimiter
from victim_service.settings import TierSpec

PNG = image_bytes(16, 16)

# ---------------------------------------------------------------------------------------------- semantics


class FakeClock:
    def __init__(self) -> None:
        self.us = 1_700_000_000 * 1_000_000 + 123  # some UTC day, mid-afternoon

    def __call__(self) -> int:
        return self.us

    def advance(self, seconds: float) -> None:
        self.us += round(seconds * 1_000_000)


def test_memory_gcra_is_exact_with_a_fake_clock() -> None:
    clock = FakeClock()
    lim = MemoryLimiter(clock)
    tier = TierSpec(rate=2.0, burst=3)
    got = [lim.check_sync("c", tier) for _ in range(4)]
    assert [d.allowed for d in got] == [True, True, True, False]
    assert [d.remaining for d in got[:3]] == [2, 1, 0]
    assert got[3].reason == "rate_limited"
    assert got[3].retry_after_s == pytest.approx(0.5)
    assert got[2].reset_s == pytest.approx(1.5)
    clock.advance(0.499)
    assert not lim.check_sync("c", tier).allowed
    clock.advance(0.001)
    assert lim.check_sync("c", tier).allowed  # exactly at retry-after
    clock.advance(10)
    assert [lim.check_sync("c", tier).allowed for _ in range(4)] == [True, True, True, False]  # burst refilled
    assert lim.check_sync("other", tier).allowed  # clients are independent


def test_memory_quotas_total_then_daily_reset_at_utc_midnight() -> None:
    clock = FakeClock()
    lim = MemoryLimiter(clock)
    total = TierSpec(rate=None, quota_total=2)
    assert [lim.check_sync("t", total).total_left for _ in range(2)] == [1, 0]
    refused = lim.check_sync("t", total)
    assert (refused.allowed, refused.reason, refused.quota, refused.retry_after_s) == (
        False, "quota_exhausted", "total", None)
    daily = TierSpec(rate=None, quota_daily=1)
    assert lim.check_sync("d", daily).allowed
    d = lim.check_sync("d", daily)
    secs_to_midnight = 86_400 - (clock.us // 1_000_000) % 86_400
    assert d.quota == "daily"
    assert d.retry_after_s == pytest.approx(secs_to_midnight, abs=1)
    clock.advance(d.retry_after_s or 0)
    assert lim.check_sync("d", daily).allowed  # a new UTC day
    # a rate-limited request does not use quota
    both = TierSpec(rate=1.0, burst=1, quota_total=5)
    assert lim.check_sync("b", both).total_left == 4
    assert not lim.check_sync("b", both).allowed
    clock.advance(1)
    assert lim.check_sync("b", both).total_left == 3


def test_redis_and_memory_limiters_agree(redis_url: str, key_prefix: str) -> None:
    tier = TierSpec(rate=4.0, burst=3, quota_total=6, quota_daily=100)

    async def run(lim) -> list[Decision]:  # type: ignore[no-untyped-def]
        out = [await lim.check("c", tier) for _ in range(4)]
        await asyncio.sleep(0.26)  # one emission interval (0.25 s) later
        out += [await lim.check("c", tier) for _ in range(2)]
        await asyncio.sleep(1.0)  # the burst is back, but the total quota (6) runs out
        out += [await lim.check("c", tier) for _ in range(3)]
        return out

    async def both() -> tuple[list[Decision], list[Decision]]:
        r = aioredis.Redis.from_url(redis_url)
        try:
            return await run(RedisLimiter(r, key_prefix)), await run(MemoryLimiter())
        finally:
            await r.aclose()

    red, mem = asyncio.run(both())
    shape = [(d.allowed, d.reason, d.quota, d.remaining, d.total_left, d.daily_left) for d in red]
    assert shape == [(d.allowed, d.reason, d.quota, d.remaining, d.total_left, d.daily_left) for d in mem]
    assert [d.allowed for d in red] == [True, True, True, False, True, False, True, True, False]
    assert red[-1].quota == "total"
    for a, b in zip(red, mem):
        assert (a.retry_after_s is None) == (b.retry_after_s is None)
        if a.retry_after_s is not None and b.retry_after_s is not None:
            assert a.retry_after_s == pytest.approx(b.retry_after_s, abs=0.05)


def test_redis_limiter_reloads_the_script_after_a_flush(private_redis) -> None:  # type: ignore[no-untyped-def]
    async def go() -> list[bool]:
        r = aioredis.Redis.from_url(private_redis.url)
        lim = RedisLimiter(r, "p:")
        first = await lim.check("c", TierSpec(rate=1.0, burst=2))
        await r.script_flush()  # like a restarted Redis: EVALSHA answers NOSCRIPT
        second = await lim.check("c", TierSpec(rate=1.0, burst=2))
        await r.aclose()
        return [first.allowed, second.allowed, second.remaining == 0]

    assert asyncio.run(go()) == [True, True, True]


# ---------------------------------------------------------------------------------------------- the service


TIERS = {
    "burst20": {"rate": 0.01, "burst": 20},
    "quota3": {"rate": None, "quota_total": 3},
    "daily2": {"rate": None, "quota_daily": 2},
    "honest": {"rate": 2.0, "burst": 1},
    "steady": {"rate": 0.1, "burst": 2, "quota_total": 1000},  # slow refill, even on a loaded machine
}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return tiny_models(tmp_path_factory.mktemp("limits-models"), ("denoise",))


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory: pytest.TempPathFactory, models: dict[str, Path],
                redis_url: str) -> Iterator[VictimServer]:
    srv = start_victim(
        tmp_path_factory.mktemp("limits"),
        models=[{"name": "denoise", "source": str(models["denoise"]), "max_batch": 8}],
        tiers=TIERS,
        keys={t: t for t in TIERS},
        redis_url=redis_url,
        key_prefix=f"heist-test:{uuid.uuid4().hex[:12]}:",
        workers=2,
    )
    yield srv
    srv.stop()


async def _flood(url: str, key: str, n: int) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=60, limits=limits) as c:
        return await asyncio.gather(*[
            c.post(f"{url}/v1/models/denoise/translate", content=PNG,
                   headers={"X-API-Key": key, "Content-Type": "image/png"})
            for _ in range(n)
        ])


def _post(srv: VictimServer, who: str) -> httpx.Response:
    return httpx.post(f"{srv.url}/v1/models/denoise/translate", content=PNG,
                      headers={**srv.headers(who), "Content-Type": "image/png"}, timeout=30)


def _metric_sum(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_burst_is_exact_across_two_workers_and_metrics_sum_both(two_workers: VictimServer) -> None:
    srv = two_workers
    responses = asyncio.run(_flood(srv.url, srv.keys["burst20"], 100))
    codes = [r.status_code for r in responses]
    assert codes.count(200) == 20, sorted(set(codes))
    assert codes.count(429) == 80
    refused = [r for r in responses if r.status_code == 429]
    assert {r.json()["error"] for r in refused} == {"rate_limited"}
    assert all(int(r.headers["retry-after"]) >= 1 and r.headers["ratelimit-remaining"] == "0" for r in refused)
    reader = LogReader(srv.settings)
    deadline = time.monotonic() + 5
    entries = []
    while time.monotonic() < deadline:
        entries = [e for e in reader.iter_entries(client="burst20")]
        if len(entries) >= 100:
            break
        time.sleep(0.1)
    assert len(entries) == 100
    workers = {e.worker for e in entries}
    assert len(workers) == 2, f"all 100 requests went to one worker ({workers}); the test proves nothing"
    for _ in range(5):  # scrapes land on either worker; every answer must hold both workers' counts
        m = httpx.get(f"{srv.url}/metrics").text
        assert _metric_sum(m, "heist_requests_total", tier="burst20", status="200") == 20
        assert _metric_sum(m, "heist_requests_total", tier="burst20", status="429") == 80
        assert _metric_sum(m, "heist_rate_limit_refusals_total", tier="burst20") == 80


def test_total_quota_runs_out_without_retry_after(two_workers: VictimServer) -> None:
    got = [_post(two_workers, "quota3") for _ in range(5)]
    assert [r.status_code for r in got] == [200, 200, 200, 429, 429]
    assert [r.headers["x-quota-remaining"] for r in got[:3]] == ["2", "1", "0"]
    assert got[3].json()["error"] == "quota_exhausted"
    assert "total" in got[3].json()["detail"]
    assert "retry-after" not in got[3].headers


def test_daily_quota_retry_after_points_at_utc_midnight(two_workers: VictimServer) -> None:
    got = [_post(two_workers, "daily2") for _ in range(3)]
    assert [r.status_code for r in got] == [200, 200, 429]
    assert got[2].json()["error"] == "quota_exhausted"
    now = dt.datetime.now(dt.UTC)
    midnight = (now + dt.timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    assert abs(int(got[2].headers["retry-after"]) - (midnight - now).total_seconds()) <= 5


def test_retry_after_is_honest(two_workers: VictimServer) -> None:
    first = _post(two_workers, "honest")
    assert first.status_code == 200
    assert first.headers["ratelimit-limit"] == "1"
    refused = _post(two_workers, "honest")
    assert refused.status_code == 429
    wait_ms = int(refused.headers["retry-after-ms"])
    assert 300 <= wait_ms <= 500
    assert refused.headers["retry-after"] == "1"
    time.sleep(wait_ms / 1000 + 0.01)
    assert _post(two_workers, "honest").status_code == 200  # the precise wait is enough
    again = _post(two_workers, "honest")
    assert again.status_code == 429
    time.sleep(int(again.headers["retry-after"]))
    assert _post(two_workers, "honest").status_code == 200  # and so is the rounded-up one


def test_ratelimit_headers_count_down(two_workers: VictimServer) -> None:
    got = [_post(two_workers, "steady") for _ in range(3)]
    assert [r.status_code for r in got] == [200, 200, 429]
    assert [r.headers["ratelimit-remaining"] for r in got] == ["1", "0", "0"]
    assert all(r.headers["ratelimit-limit"] == "2" for r in got)
    assert [r.headers["x-quota-remaining"] for r in got] == ["999", "998", "998"]


# ---------------------------------------------------------------------------------------------- Redis outages


def test_redis_down_gives_503_then_recovers(tmp_path: Path, models: dict[str, Path], private_redis) -> None:  # type: ignore[no-untyped-def]
    srv = start_victim(
        tmp_path, models=[{"name": "denoise", "source": str(models["denoise"]), "max_batch": 1}],
        tiers={"t": {"rate": 100.0, "burst": 100}}, keys={"k": "t"}, redis_url=private_redis.url,
        extra={"redis_timeout_s": 0.3},
    )
    try:
        assert _post(srv, "k").status_code == 200
        private_redis.stop()
        down = _post(srv, "k")
        assert down.status_code == 503, down.text
        assert down.json()["error"] == "backend_unavailable"
        assert down.headers["retry-after"] == "1"
        ready = httpx.get(f"{srv.url}/readyz")
        assert ready.status_code == 503
        assert ready.json()["redis"] == "down"
        assert httpx.get(f"{srv.url}/healthz").status_code == 200
        for route in ("/v1/admin/clients", "/v1/admin/clients/k/risk", "/v1/admin/clients/k/level"):
            admin = httpx.get(f"{srv.url}{route}", headers=srv.admin_headers)  # monitor and level views: 503 too
            assert admin.status_code == 503, (route, admin.text)
            assert admin.json()["error"] == "backend_unavailable"
        private_redis.start()  # same port, empty: no script cache, no data
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _post(srv, "k").status_code != 200:
            time.sleep(0.1)
        back = _post(srv, "k")
        assert back.status_code == 200
        assert back.headers["ratelimit-limit"] == "100"
        assert httpx.get(f"{srv.url}/readyz").status_code == 200
        # the refused request was logged: spilled to a JSONL file while Redis was down, then moved into the
        # stream once Redis was back (the monitor and `heist log` read only the stream)
        r = redis.Redis.from_url(private_redis.url)
        spill = Path(srv.data_dir) / "querylog-spill.jsonl"

        def refused_in_stream() -> bool:
            return any(b'"code":"backend_unavailable"' in f[b"e"] for _, f in r.xrange(f"{srv.key_prefix}querylog"))

        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not refused_in_stream():
            time.sleep(0.05)
        assert refused_in_stream()
        assert not spill.exists()
        assert not list(Path(srv.data_dir).glob("querylog-spill.*.replaying"))
    finally:
        srv.stop()


def test_fail_open_admits_without_limits_while_redis_is_down(
    tmp_path: Path, models: dict[str, Path], private_redis  # type: ignore[no-untyped-def]
) -> None:
    srv = start_victim(
        tmp_path, models=[{"name": "denoise", "source": str(models["denoise"]), "max_batch": 1}],
        tiers={"t": {"rate": 0.01, "burst": 1}}, keys={"k": "t"}, redis_url=private_redis.url,
        extra={"on_redis_error": "open", "redis_timeout_s": 0.3, "key_cache_s": 0.3},
    )
    try:
        made = httpx.post(f"{srv.url}/v1/admin/keys", json={"name": "stored", "tier": "t"}, headers=srv.admin_headers)
        stored = {"X-API-Key": made.json()["key"], "Content-Type": "image/png"}
        assert httpx.post(f"{srv.url}/v1/models/denoise/translate", content=PNG, headers=stored).status_code == 200
        assert _post(srv, "k").status_code == 200
        assert _post(srv, "k").status_code == 429
        private_redis.stop()
        opened = [_post(srv, "k") for _ in range(3)]
        assert [r.status_code for r in opened] == [200, 200, 200]
        assert "ratelimit-limit" not in opened[0].headers
        time.sleep(0.5)  # past key_cache_s: a stored key the store vouched for is still known during the outage
        again = httpx.post(f"{srv.url}/v1/models/denoise/translate", content=PNG, headers=stored, timeout=30)
        assert again.status_code == 200, again.text
        assert httpx.get(f"{srv.url}/readyz").status_code == 200  # fail-open stays ready
        private_redis.start()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and "ratelimit-limit" not in _post(srv, "k").headers:
            time.sleep(0.1)
        assert _post(srv, "k").status_code == 429  # limits are back (fresh Redis: burst used above)
    finally:
        srv.stop()


def test_embedded_limiter_is_exact_in_one_worker(tmp_path: Path, models: dict[str, Path]) -> None:
    srv = start_victim(
        tmp_path, models=[{"name": "denoise", "source": str(models["denoise"]), "max_batch": 8}],
        tiers={"t": {"rate": 0.01, "burst": 7}}, keys={"k": "t"},
    )
    try:
        codes = [r.status_code for r in asyncio.run(_flood(srv.url, srv.keys["k"], 30))]
        assert codes.count(200) == 7
        assert codes.count(429) == 23
        assert httpx.get(f"{srv.url}/readyz").json()["redis"] == "off"
    finally:
        srv.stop()
