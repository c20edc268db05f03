"""The query monitor inside a real victim service with real Redis: detection, shared state across workers,
resume after a crash, malformed log entries, the embedded JSONL mode, the admin routes and the CLI."""

from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path

import httpx
import pytest
import redis
from typer.testing import CliRunner

from attacker.benign import BenignParams
from attacker.strategies import build_strategy
from attacker.victim_info import ModelInfo
from evaluation.monitor_eval import AttackerSpec, evaluate_live
from heist.cli.main import app as cli
from tests.servers import VictimServer, start_victim, tiny_models
from translators.codecs import encode_image
from translators.corpus import load_images
from translators.errors import HeistError
from victim_service.monitor import QueryMonitor
from victim_service.settings import Settings

TIERS = {"open": {"rate": None}}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return tiny_models(tmp_path_factory.mktemp("models"), ("sr4x",))


def _crops(n: int, seed: int = 0) -> list[bytes]:
    info = ModelInfo(name="sr4x", task="sr", scale=4, min_side=8)
    st = build_strategy("crops", load_images("corpus:attacker"), info, seed=seed)
    return [encode_image(st.make(i).image, "png") for i in range(n)]


def _send(srv: VictimServer, client: str, bodies: list[bytes], fresh: bool = False) -> None:
    """POST every body as ``client``; ``fresh``: a new connection each, three at a time, so that a server's two
    workers both answer some (one at a time, a loaded machine let one worker accept them all)."""
    hdr = {**srv.headers(client), "Content-Type": "image/png"}
    if fresh:
        from concurrent.futures import ThreadPoolExecutor

        def post(b: bytes) -> httpx.Response:
            return httpx.post(f"{srv.url}/v1/models/sr4x/translate", content=b, headers=hdr, timeout=30)

        with ThreadPoolExecutor(3) as pool:
            for r in pool.map(post, bodies):
                assert r.status_code == 200, r.text
        return
    with httpx.Client(base_url=srv.url, timeout=30) as h:
        for b in bodies:
            r = h.post("/v1/models/sr4x/translate", content=b, headers=hdr)
            assert r.status_code == 200, r.text


def _risk(srv: VictimServer, client: str) -> dict:
    r = httpx.get(f"{srv.url}/v1/admin/clients/{client}/risk", headers=srv.admin_headers, timeout=10)
    return r.json() if r.status_code == 200 else {"queries": 0, "status": r.status_code}


def _wait_queries(srv: VictimServer, client: str, n: int, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        risk = _risk(srv, client)
        if risk["queries"] >= n or time.monotonic() > deadline:
            return risk
        time.sleep(0.1)


def _metric(srv: VictimServer, name: str) -> float | None:
    text = httpx.get(f"{srv.url}/metrics", timeout=10).text
    m = re.search(rf"^{name}(?:{{[^}}]*}})? ([0-9.e+-]+)$", text, re.M)
    return float(m.group(1)) if m else None


@pytest.mark.slow
def test_attackers_flagged_benign_not_two_workers_share_one_score(
        tmp_path: Path, models: dict[str, Path], redis_url: str, key_prefix: str) -> None:
    srv = start_victim(tmp_path, models=[{"name": "sr4x", "source": str(models["sr4x"]), "max_batch": 4}],
                       tiers=TIERS, keys={"alice": "open"}, redis_url=redis_url, key_prefix=key_prefix, workers=2)
    try:
        ben = load_images("corpus:victim") + load_images("corpus:benchmark")
        res = asyncio.run(evaluate_live(
            srv.url, srv.admin_key, "sr4x", ben, load_images("corpus:attacker"),
            [AttackerSpec(name="crops", strategy="crops", queries=40),
             AttackerSpec(name="sybil", strategy="tiles", keys=3, queries=45),
             AttackerSpec(name="sybil-crops", strategy="crops", keys=3, queries=30)],
            BenignParams(clients=4, photos_per_client=3, max_side=64, think_s=(0.0, 0.3)), seed=0, tier="open",
            time_scale=1.0, run_id="t"))
        assert res["caught_up"], res
        crops, sybil, sybil_crops = res["attackers"]
        assert crops["queries_to_detection"] is not None, crops
        assert crops["queries_to_detection"] <= 50, crops
        assert crops["levels"][0] >= 1
        assert sybil["flagged_keys"] >= 1, sybil
        assert sybil["queries_to_detection"] <= 50, sybil
        # 10 crops a key: the monitor's own rule (2 shared regions with one other key) rarely links them yet; the
        # admin view's `linked` is that rule, not "any one shared source or region" (which said 2/3 here)
        assert sybil_crops["linked_fraction"] is not None
        assert res["benign"]["linked"] == 0, res["benign"]
        assert res["benign"]["clients"] == 4
        assert res["benign"]["flagged"] == 0, res["benign"]
        # the escalation went through the shared level store
        levels = redis.Redis.from_url(redis_url).hgetall(f"{key_prefix}levels")
        rec = json.loads(levels[b"t-crops-k0"])
        assert rec["level"] >= 1
        assert rec["source"] == "monitor"
        # one client's queries served by both workers are counted in one score
        _send(srv, "alice", _crops(30, seed=5), fresh=True)
        log = httpx.get(f"{srv.url}/v1/admin/log", params={"client": "alice", "limit": 100},
                        headers=srv.admin_headers).json()
        assert len({e["worker"] for e in log}) == 2
        assert all(e["embedding"] for e in log)
        assert all(e["regions"] for e in log)
        risk = _wait_queries(srv, "alice", 30)
        assert risk["queries"] == 30, risk
        assert risk["flagged"], risk
        assert {k for k in risk["signals"]} >= {"knn", "reuse"}
        views = {json.dumps(_risk(srv, "alice"), sort_keys=True) for _ in range(6)}
        assert len(views) == 1  # whichever worker answers
        listed = httpx.get(f"{srv.url}/v1/admin/clients", headers=srv.admin_headers).json()["clients"]
        assert listed[0]["risk"] >= listed[-1]["risk"]
        assert {c["client"] for c in listed} >= {"alice", "t-crops-k0"}
        assert _metric(srv, "heist_monitor_up") == 1.0
        # the CLI prints the same thing
        out = CliRunner().invoke(cli, ["monitor", "status", "--url", srv.url, "--admin-key", srv.admin_key,
                                       "--client", "alice", "--json"])
        assert out.exit_code == 0, out.output
        assert json.loads(out.output)["queries"] == 30
        table = CliRunner().invoke(cli, ["monitor", "status", "--url", srv.url, "--admin-key", srv.admin_key,
                                         "--client", "alice"], env={"COLUMNS": None})  # piped: full width
        assert table.exit_code == 0, table.output
        for name in risk["signals"]:  # every signal, those at 0 too ("with all its signals")
            assert f"{name}=" in table.output, (name, table.output)
        bad = CliRunner().invoke(cli, ["monitor", "status", "--url", srv.url, "--admin-key", "wrong-key-123456",
                                       "--client", "alice"])
        assert bad.exit_code != 0
    finally:
        srv.stop()


def test_restart_resumes_without_loss_or_double_count_and_skips_malformed(
        tmp_path: Path, models: dict[str, Path], redis_url: str, key_prefix: str) -> None:
    spec = [{"name": "sr4x", "source": str(models["sr4x"]), "max_batch": 4}]
    r = redis.Redis.from_url(redis_url)
    bodies = _crops(30, seed=1)
    srv = start_victim(tmp_path, models=spec, tiers=TIERS, keys={"alice": "open"}, redis_url=redis_url,
                       key_prefix=key_prefix)
    try:
        _send(srv, "alice", bodies[:12])
        assert _wait_queries(srv, "alice", 12)["queries"] == 12
        stream = f"{key_prefix}querylog"
        r.xadd(stream, {"e": b"{not json"})
        r.xadd(stream, {"e": json.dumps({"client": "alice", "ts": "noon", "status": 200})})
        r.xadd(stream, {"junk": b"1"})
        deadline = time.monotonic() + 10
        while (_metric(srv, "heist_monitor_malformed_total") or 0) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _metric(srv, "heist_monitor_malformed_total") == 3.0
        _send(srv, "alice", bodies[12:24])
        deadline = time.monotonic() + 10
        while r.xlen(stream) < 27 and time.monotonic() < deadline:  # logged; maybe not yet scored
            time.sleep(0.02)
        srv.process.kill()  # SIGKILL: no shutdown, the lease and pending entries stay behind
    finally:
        srv.process.kill()
    srv2 = start_victim(tmp_path, models=spec, tiers=TIERS, keys={"alice": "open"}, redis_url=redis_url,
                        key_prefix=key_prefix, name="victim2")
    try:
        _send(srv2, "alice", bodies[24:])
        risk = _wait_queries(srv2, "alice", 30, timeout=40)
        time.sleep(1.0)  # anything counted twice would show up now
        risk = _risk(srv2, "alice")
        assert risk["queries"] == 30, risk
        assert risk["admitted"] == 30, risk
        assert risk["flagged"]
        pending = r.xpending(f"{key_prefix}querylog", "monitor")
        assert pending["pending"] == 0
    finally:
        srv2.stop()


def test_embedded_mode_replays_the_jsonl_log(tmp_path: Path, models: dict[str, Path]) -> None:
    spec = [{"name": "sr4x", "source": str(models["sr4x"]), "max_batch": 4}]
    srv = start_victim(tmp_path, models=spec, tiers=TIERS, keys={"alice": "open"})
    try:
        _send(srv, "alice", _crops(25, seed=2))
        first = _wait_queries(srv, "alice", 25)
        assert first["queries"] == 25
        assert first["flagged"]
        with open(srv.data_dir / "querylog.jsonl", "a") as fh:
            fh.write("this is not json\n")
    finally:
        srv.stop()
    srv = start_victim(tmp_path, models=spec, tiers=TIERS, keys={"alice": "open"})  # same data dir
    try:
        again = _wait_queries(srv, "alice", 25)
        assert again["queries"] == 25
        assert again["flagged_at_query"] == first["flagged_at_query"]
        assert _metric(srv, "heist_monitor_malformed_total") == 1.0
        assert httpx.get(f"{srv.url}/v1/admin/clients/nobody/risk", headers=srv.admin_headers).status_code == 404
        bad = httpx.get(f"{srv.url}/v1/admin/clients/no%20body/risk", headers=srv.admin_headers)  # was 404
        assert (bad.status_code, bad.json()["error"]) == (400, "bad_client"), bad.text
        # an admin's by-hand level is the one in force; the risk view shows both
        assert again["level"] >= 1
        monitor_level = again["level"]
        assert again["level_in_force"] == again["level"]  # the monitor's escalation, from the level store
        done = httpx.post(f"{srv.url}/v1/admin/clients/alice/level", json={"level": 0, "reason": "checked"},
                          headers=srv.admin_headers)
        assert done.status_code == 200, done.text
        risk = httpx.get(f"{srv.url}/v1/admin/clients/alice/risk", headers=srv.admin_headers).json()
        assert (risk["level"], risk["level_in_force"]) == (again["level"], 0)
        bad = httpx.get(f"{srv.url}/v1/admin/clients/bad%20name!/level", headers=srv.admin_headers)
        assert bad.status_code == 400
        assert bad.json()["error"] == "bad_client"
        bad = httpx.get(f"{srv.url}/v1/admin/clients/alice%0A/level", headers=srv.admin_headers)
        assert (bad.status_code, bad.json()["error"]) == (400, "bad_client")
        # benign customers through the CLI: keys made through the admin API, photos sent, nobody flagged
        out = CliRunner().invoke(cli, ["traffic", "benign", "--url", srv.url, "--model", "sr4x", "--admin-key",
                                       srv.admin_key, "--clients", "2", "--photos", "2", "--tier", "open",
                                       "--time-scale", "0", "--images", "corpus:benchmark"])
        assert out.exit_code == 0, out.output
        assert "2 customers sent" in out.output
        cust = _wait_queries(srv, "benign-001", 2)
        assert cust["queries"] >= 2
        assert not cust["flagged"]
        again = CliRunner().invoke(cli, ["traffic", "benign", "--url", srv.url, "--model", "sr4x", "--admin-key",
                                         srv.admin_key, "--clients", "1", "--tier", "open"])  # benign-000 has a key
        assert isinstance(again.exception, HeistError)
        assert "refused to create key 'benign-000'" in str(again.exception)
        assert "HTTP 400" in str(again.exception)
        # a pool too small for the customers: refused before any key is made (shared photos link their keys)
        shared = CliRunner().invoke(cli, ["traffic", "benign", "--url", srv.url, "--model", "sr4x", "--admin-key",
                                          srv.admin_key, "--clients", "3", "--photos", "2", "--tier", "open",
                                          "--images", "corpus:benchmark", "--prefix", "shared"])
        assert isinstance(shared.exception, HeistError)
        assert "5 photos in corpus:benchmark for 3 customers x 2 photos" in str(shared.exception)
        assert "--allow-shared" in str(shared.exception)
    finally:
        srv.stop()
    # a third start: the log is replayed again, and the admin's level 0 (kept in levels.json) stays in force
    srv = start_victim(tmp_path, models=spec, tiers=TIERS, keys={"alice": "open"})
    try:
        third = _wait_queries(srv, "alice", 25)
        assert third["level"] == monitor_level  # the monitor's own view, rebuilt from the log
        level = httpx.get(f"{srv.url}/v1/admin/clients/alice/level", headers=srv.admin_headers).json()
        assert (level["level"], level["source"], level["reason"]) == (0, "admin", "checked")
        assert third["level_in_force"] == 0
        never = httpx.get(f"{srv.url}/v1/admin/clients/nobody/level", headers=srv.admin_headers).json()
        assert (never["level"], never["source"], never["set_at"]) == (0, "none", 0.0)
    finally:
        srv.stop()


def test_monitor_switch_and_redis_down(tmp_path: Path, models: dict[str, Path], private_redis) -> None:  # type: ignore[no-untyped-def]
    spec = [{"name": "sr4x", "source": str(models["sr4x"]), "max_batch": 4}]
    base = {"tiers": TIERS, "redis_url": private_redis.url}
    assert QueryMonitor.wanted(Settings.from_mapping(base))
    assert not QueryMonitor.wanted(Settings.from_mapping({**base, "monitor": {"enabled": False}}))
    assert not QueryMonitor.wanted(Settings.from_mapping({**base, "query_log": {"backend": "off"}}))
    srv = start_victim(tmp_path, models=spec, tiers=TIERS, keys={"alice": "open"}, redis_url=private_redis.url,
                       extra={"redis_timeout_s": 0.3, "on_redis_error": "open", "monitor": {"fail_safe_level": 1}})
    try:
        _send(srv, "alice", _crops(3))
        private_redis.stop()
        deadline = time.monotonic() + 10
        while _metric(srv, "heist_monitor_up") != 0.0 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _metric(srv, "heist_monitor_up") == 0.0
        assert (_metric(srv, "heist_monitor_errors_total") or 0) >= 1
        private_redis.start()
        deadline = time.monotonic() + 15
        while _metric(srv, "heist_monitor_up") != 1.0 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _metric(srv, "heist_monitor_up") == 1.0
    finally:
        srv.stop()
