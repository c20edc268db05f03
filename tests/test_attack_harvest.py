"""Harvesting against a real victim server (uvicorn on 127.0.0.1, real Redis, tiny models).

Rate limit respected and >= 90% of the allowed rate, kill -9 then resume gives exactly the budget,
quota exhaustion stops cleanly, several keys spread the budget, 401/404/unreachable are clear errors,
a 5xx storm (Redis down -> 503) stops the run with the pairs kept and a resume finishes it.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from attacker.errors import (
    InputsRefusedError,
    UnauthorizedError,
    UnknownModelError,
    VictimFailingError,
    VictimUnreachableError,
)
from attacker.files import read_jsonl
from attacker.harvest import harvest
from attacker.pairstore import PairStore
from attacker.runinfo import read_run
from attacker.strategies import build_strategy
from attacker.victim_info import ModelInfo
from tests.conftest import free_port
from tests.servers import VictimServer, start_victim, tiny_models
from translators.codecs import encode_image
from translators.corpus import NamedImage, load_images

TIERS = {
    "fast": {"rate": 10.0, "burst": 5},
    "quota": {"rate": None, "quota_total": 7},
    "sybil": {"rate": 4.0, "burst": 2},
    "open": {"rate": None},
    "bursty": {"rate": 2.0, "burst": 10},
}
CLIENTS = {"rate": "fast", "crash": "fast", "cli": "fast", "quota": "quota", "quota2": "quota", "s1": "sybil",
           "s2": "sybil", "open": "open", "bursty": "bursty"}


@pytest.fixture(scope="module")
def victim(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[VictimServer]:
    tmp = tmp_path_factory.mktemp("attack-victim")
    srv = start_victim(tmp, tiers=TIERS, keys=CLIENTS, redis_url=redis_url,
                       key_prefix=f"heist-test:{uuid.uuid4().hex[:12]}:")
    yield srv
    srv.stop()


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", "from heist.cli.main import main; main()", *args],
                          capture_output=True, text=True, timeout=timeout, env={**os.environ, "COLUMNS": "200"})


def _log_statuses(run: Path) -> Counter[str]:
    return Counter(str(r.get("status")) for r in read_jsonl(run / "harvest_log.jsonl").records)


def test_harvest_respects_the_rate_limit_and_reaches_90_percent_of_it(victim: VictimServer, tmp_path: Path) -> None:
    rate, burst = TIERS["fast"]["rate"], TIERS["fast"]["burst"]
    r = harvest(victim.url, victim.keys["rate"], "denoise", tmp_path / "run", budget=45,
                strategy_params={"crop_size": 32})
    assert r.status == "complete"
    assert r.pairs == 45
    statuses = _log_statuses(tmp_path / "run")
    assert statuses["200"] == 45
    assert statuses["429"] <= 3  # at most a probe or two; never a burst of refusals
    session = r.summary["sessions"][-1]
    ideal = burst + rate * session["active_s"]  # what a perfect client could get in the same time
    assert 45 / ideal >= 0.9, session
    assert r.summary["allowed_rate_estimate"] == pytest.approx(rate, rel=0.1)
    bursty = harvest(victim.url, victim.keys["bursty"], "denoise", tmp_path / "bursty", budget=20,
                     strategy_params={"crop_size": 32})
    assert bursty.summary["steady_rate"] <= 2.0 * 1.15, bursty.summary  # the burst's late answers are not steady
    run = read_run(tmp_path / "run")
    assert run["target"]["info"]["task"] == "denoise"
    assert "arch" not in json.dumps(run["target"])  # the API never reveals it


def test_kill_9_mid_harvest_then_resume_gives_exactly_the_budget(victim: VictimServer, tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["attack", "harvest", "--url", victim.url, "--api-key", victim.keys["crash"], "--model", "sr4x",
            "--out", str(out), "--budget", "40", "--crop-size", "16", "--seed", "7"]
    proc = subprocess.Popen([sys.executable, "-c", "from heist.cli.main import main; main()", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    manifest = out / "pairs" / "manifest.jsonl"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if manifest.exists() and manifest.read_bytes().count(b"\n") >= 12:
            break
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    before = len(read_jsonl(manifest).records)
    assert 12 <= before < 40
    done = _cli(*args)
    assert done.returncode == 0, done.stderr
    store = PairStore(out / "pairs").open(writable=False)
    recs = store.ok_records()
    assert len(recs) == 40
    assert sorted(r.query_index for r in recs) == list(range(40))  # none missing, none twice
    assert len(read_jsonl(manifest).records) == 40
    # every stored input is exactly the deterministic query of its index
    info = ModelInfo.model_validate(next(m for m in httpx.get(f"{victim.url}/v1/models").json() if m["name"] == "sr4x"))
    strategy = build_strategy("crops", load_images("corpus:attacker"), info, {"crop_size": 16, "noise_sigma": "auto",
                                                                               "downscale": "auto", "pool": 16}, 7)
    for rec in recs[:: 7]:
        assert (out / "pairs" / rec.input).read_bytes() == encode_image(strategy.make(rec.query_index).image)
        x, y = store.load_pair(rec)
        assert y.shape[-1] == 4 * x.shape[-1]
    run = read_run(out)
    assert run["harvest"]["status"] == "complete"
    assert [s["session"] for s in run["harvest"]["sessions"]] == [1, 2]


def test_quota_exhaustion_stops_cleanly(victim: VictimServer, tmp_path: Path) -> None:
    r = harvest(victim.url, victim.keys["quota"], "denoise", tmp_path / "run", budget=12,
                strategy_params={"crop_size": 16})
    assert r.status == "stopped"
    assert r.stop_reason == "quota_exhausted"
    assert r.pairs == 7
    assert len(PairStore(tmp_path / "run" / "pairs").open(writable=False)) == 7
    run = read_run(tmp_path / "run")
    assert run["harvest"]["status"] == "stopped"
    assert run["harvest"]["stop_reason"] == "quota_exhausted"
    assert run["harvest"]["queries_sent"] <= 7 + 8  # X-Quota-Remaining retires the key; no refusal storm
    # the CLI says so and exits 3 (incomplete but clean), not with a traceback
    cp = _cli("attack", "harvest", "--url", victim.url, "--api-key", victim.keys["quota2"], "--model", "denoise",
              "--out", str(tmp_path / "cli"), "--budget", "10", "--crop-size", "16")
    assert cp.returncode == 3, cp.stderr
    assert "harvest stopped early: quota_exhausted" in cp.stderr
    assert "Traceback" not in cp.stderr


def test_several_keys_spread_the_budget_and_add_their_rates(victim: VictimServer, tmp_path: Path) -> None:
    r = harvest(victim.url, [victim.keys["s1"], victim.keys["s2"]], "denoise", tmp_path / "run", budget=36,
                strategy_params={"crop_size": 16})
    assert r.pairs == 36
    keys = {k["label"]: k for k in r.summary["sessions"][-1]["keys"]}
    assert keys["k0"]["pairs"] >= 12
    assert keys["k1"]["pairs"] >= 12
    session = r.summary["sessions"][-1]
    ideal = 2 * (TIERS["sybil"]["burst"] + TIERS["sybil"]["rate"] * session["active_s"])
    assert 36 / ideal >= 0.85, session
    assert all(len(k["fingerprint"]) == 10 for k in keys.values())
    assert victim.keys["s1"] not in (tmp_path / "run" / "run.json").read_text()  # keys are never written


def test_wrong_key_unknown_model_and_dead_url_are_clear_errors(victim: VictimServer, tmp_path: Path) -> None:
    with pytest.raises(UnauthorizedError, match="refused API key k0"):
        harvest(victim.url, "hk_not_a_real_key_000000", "denoise", tmp_path / "a", budget=3)
    with pytest.raises(UnknownModelError, match=r"serves no model .nope. \(it serves: .*denoise"):
        harvest(victim.url, victim.keys["open"], "nope", tmp_path / "b", budget=3)
    assert not (tmp_path / "b").exists()  # nothing written for a run that never started
    with pytest.raises(VictimUnreachableError, match="cannot reach"):
        harvest(f"http://127.0.0.1:{free_port()}", victim.keys["open"], "denoise", tmp_path / "c", budget=3)
    cp = _cli("attack", "harvest", "--url", victim.url, "--api-key", "hk_wrong_key_1234567890", "--model", "denoise",
              "--out", str(tmp_path / "d"), "--budget", "2")
    assert cp.returncode == 2
    assert cp.stderr.strip().startswith("error:")
    assert "401" in cp.stderr
    assert "Traceback" not in cp.stderr
    cp = _cli("attack", "harvest", "--url", "ftp://x", "--api-key", "k", "--model", "m", "--out", str(tmp_path / "e"))
    assert cp.returncode == 2
    assert "must start with http://" in cp.stderr
    # --zoom: a malformed or out-of-range value is a one-line error and writes nothing; a good one is recorded
    base = ["attack", "harvest", "--url", victim.url, "--api-key", victim.keys["open"], "--model", "denoise",
            "--budget", "2", "--crop-size", "16"]
    for bad, message in (("abc", "--zoom must be S or LO:HI"), ("0.5:2", "zoom must be [lo, hi]")):
        cp = _cli(*base, "--out", str(tmp_path / "z-bad"), "--zoom", bad)
        assert cp.returncode == 2, cp.stderr
        assert message in cp.stderr
        assert "Traceback" not in cp.stderr
        assert not (tmp_path / "z-bad").exists()
    cp = _cli(*base, "--out", str(tmp_path / "z"), "--zoom", "0.5:1")
    assert cp.returncode == 0, cp.stderr
    assert read_run(tmp_path / "z")["harvest"]["strategy"]["zoom"] == [0.5, 1.0]


def test_inputs_outside_the_published_limits_are_skipped_and_replaced(victim: VictimServer, tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    imgs = [NamedImage("tiny", torch.rand(1, 3, 4, 4, generator=g)), NamedImage("ok", torch.rand(1, 3, 24, 24,
                                                                                                   generator=g))]
    r = harvest(victim.url, victim.keys["open"], "denoise", tmp_path / "run", images=imgs, strategy="random",
                budget=3, strategy_params={"noise_sigma": 10})
    assert r.pairs == 3
    store = PairStore(tmp_path / "run" / "pairs").open(writable=False)
    refused = store.refused_records()
    assert refused
    assert all(x.source == "tiny" and x.code == "refused_locally" for x in refused)
    assert {x.source for x in store.ok_records()} == {"ok"}
    with pytest.raises(InputsRefusedError, match="refused"):
        harvest(victim.url, victim.keys["open"], "denoise", tmp_path / "run2", images=imgs[:1], strategy="random",
                budget=3, max_refused=2)


def test_photos_smaller_than_the_size_multiple_are_refused_locally_not_fatal(tmp_path: Path) -> None:
    """A U-Net victim needs sides that are multiples of 8: a 6x6 photo fits to nothing. ``random`` and
    ``interleave`` (whole photos) record it as ``refused_locally`` and go on with the other photo."""
    models = tiny_models(tmp_path / "m", ("unet8",))
    srv = start_victim(tmp_path, models=[{"name": "u", "source": str(models["unet8"]), "max_batch": 1}],
                       tiers={"open": {"rate": None}}, keys={"open": "open"})
    g = torch.Generator().manual_seed(0)
    imgs = [NamedImage("tiny", torch.rand(1, 3, 6, 6, generator=g)),
            NamedImage("ok", torch.rand(1, 3, 40, 40, generator=g))]
    try:
        for strategy, params in [("random", {"noise_sigma": 10}), ("interleave", {"crop_size": 16, "min_side": 8})]:
            r = harvest(srv.url, srv.keys["open"], "u", tmp_path / strategy, images=imgs, strategy=strategy,
                        budget=6, strategy_params=params)
            assert r.pairs == 6, strategy
            store = PairStore(tmp_path / strategy / "pairs").open(writable=False)
            assert {x.source for x in store.ok_records()} == {"ok"}, strategy
            assert all(x.code == "refused_locally" for x in store.refused_records())
        assert store.refused_records()  # the tiny photo came up and was refused, not sent
    finally:
        srv.stop()


def test_max_rate_paces_each_key_below_what_the_victim_allows(victim: VictimServer, tmp_path: Path) -> None:
    """``max_rate`` (evasion: a customer's pace) on an unlimited key: sends at least 1/rate apart; the same
    harvest resumes at another rate (pacing is not part of its identity)."""
    r = harvest(victim.url, victim.keys["open"], "denoise", tmp_path / "run", budget=5, max_rate=5.0,
                strategy_params={"crop_size": 16})
    assert r.pairs == 5
    lines = read_jsonl(tmp_path / "run" / "harvest_log.jsonl").records
    sends = sorted(rec["t"] - rec["latency_ms"] / 1000 for rec in lines)
    gaps = [b - a for a, b in itertools.pairwise(sends)]
    # 5 requests/s at most (send times estimated from the log: answer time - latency, so some slack);
    # a loaded machine only makes gaps longer
    assert sends[-1] - sends[0] >= 0.7, gaps
    assert min(gaps) >= 0.1, gaps
    more = harvest(victim.url, victim.keys["open"], "denoise", tmp_path / "run", budget=6,
                   strategy_params={"crop_size": 16})
    assert (more.pairs, more.new_pairs) == (6, 1)


def test_a_different_harvest_in_the_same_folder_is_refused(victim: VictimServer, tmp_path: Path) -> None:
    harvest(victim.url, victim.keys["open"], "denoise", tmp_path / "run", budget=2, strategy_params={"crop_size": 16})
    from attacker.errors import RunFolderError

    with pytest.raises(RunFolderError, match="different seed"):
        harvest(victim.url, victim.keys["open"], "denoise", tmp_path / "run", budget=2, seed=5,
                strategy_params={"crop_size": 16})
    more = harvest(victim.url, victim.keys["open"], "denoise", tmp_path / "run", budget=4,
                   strategy_params={"crop_size": 16})
    assert (more.pairs, more.new_pairs) == (4, 2)  # a larger budget extends the harvest
    # a folder harvested before `leaves` existed: its queries were crops only, so it resumes with leaves 0
    run_json = tmp_path / "run" / "run.json"
    run = json.loads(run_json.read_text())
    del run["harvest"]["identity"]["strategy_params"]["leaves"]
    run_json.write_text(json.dumps(run))
    with pytest.raises(RunFolderError, match=r"'leaves': 0\.0"):
        harvest(victim.url, victim.keys["open"], "denoise", tmp_path / "run", budget=5,
                strategy_params={"crop_size": 16})
    old = harvest(victim.url, victim.keys["open"], "denoise", tmp_path / "run", budget=5,
                  strategy_params={"crop_size": 16, "leaves": 0})
    assert (old.pairs, old.new_pairs) == (5, 1)


@pytest.mark.parametrize(("strategy", "params"), [("crops", {"crop_size": 16, "zoom": (0.5, 1.0)}),
                                                  ("novel", {"crop_size": 16, "scale": (1.0, 3.0)})])
def test_a_harvest_with_range_parameters_resumes(victim: VictimServer, tmp_path: Path, strategy: str,
                                                 params: dict[str, object]) -> None:
    """Range parameters are tuples in the strategy and lists in run.json: the same options still resume."""
    first = harvest(victim.url, victim.keys["open"], "denoise", tmp_path / "run", budget=2, strategy=strategy,
                    strategy_params=params)
    more = harvest(victim.url, victim.keys["open"], "denoise", tmp_path / "run", budget=3, strategy=strategy,
                   strategy_params=params)
    assert (first.pairs, more.pairs, more.new_pairs) == (2, 3, 1)


def test_5xx_storm_stops_with_pairs_kept_and_resume_finishes(tmp_path: Path, private_redis) -> None:
    srv = start_victim(tmp_path, tiers={"fast": {"rate": 20.0, "burst": 5}}, keys={"a": "fast"},
                       redis_url=private_redis.url, key_prefix="heist-test:storm:")
    try:
        out = tmp_path / "run"
        manifest = out / "pairs" / "manifest.jsonl"

        def kill_redis() -> None:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                if manifest.exists() and manifest.read_bytes().count(b"\n") >= 8:
                    private_redis.stop()
                    return
                time.sleep(0.01)

        t = threading.Thread(target=kill_redis)
        t.start()
        with pytest.raises(VictimFailingError, match=r"keeps failing .*503"):
            harvest(srv.url, srv.keys["a"], "denoise", out, budget=60, strategy_params={"crop_size": 16},
                    client={"max_retries": 3, "backoff_base_s": 0.05, "backoff_max_s": 0.2, "storm_limit": 10})
        t.join()
        kept = len(PairStore(out / "pairs").open(writable=False))
        assert 8 <= kept < 60
        assert read_run(out)["harvest"]["status"] == "failed"
        assert _log_statuses(out)["503"] >= 4
        private_redis.start()
        r = harvest(srv.url, srv.keys["a"], "denoise", out, budget=60, strategy_params={"crop_size": 16})
        assert r.pairs == 60
        assert sorted(x.query_index for x in PairStore(out / "pairs").open(writable=False).ok_records()) == list(
            range(60))
    finally:
        srv.stop()


def test_pixel_budget_and_the_adaptive_strategy_against_the_server(victim: VictimServer, tmp_path: Path) -> None:
    r = harvest(victim.url, victim.keys["open"], "denoise", tmp_path / "run", strategy="diversity", budget=50,
                budget_pixels=10 * 24 * 24 + 100, strategy_params={"crop_size": 24, "pool": 8})
    assert r.status == "stopped"
    assert r.stop_reason == "pixel_budget"
    assert r.pairs == 10
    assert r.summary["input_pixels"] == 10 * 24 * 24
    # resuming an adaptive harvest feeds the stored pairs back to the strategy and extends it
    more = harvest(victim.url, victim.keys["open"], "denoise", tmp_path / "run", strategy="diversity", budget=14,
                   strategy_params={"crop_size": 24, "pool": 8})
    assert (more.status, more.pairs) == ("complete", 14)
    recs = PairStore(tmp_path / "run" / "pairs").open(writable=False).ok_records()
    crops = {(x.source, *x.crop) for x in recs}
    assert len(crops) == 14
