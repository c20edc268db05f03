"""The per-request defense time budget (``defense_budget_ms``) through the real service (uvicorn + Redis):
a defense that runs longer than the budget is counted per defense in ``/metrics`` and logged with a warning;
a defense within the budget is not counted, and the service keeps answering."""

from __future__ import annotations

import re
from pathlib import Path

import httpx

from tests.servers import image_bytes, start_victim


def _over_budget(metrics: str, defense: str) -> float:
    m = re.search(rf'heist_defense_over_budget_total\{{[^}}]*defense="{defense}"[^}}]*\}} ([0-9.e+]+)', metrics)
    return float(m.group(1)) if m else 0.0


def test_a_defense_over_the_time_budget_is_counted_and_logged(tmp_path: Path, redis_url: str, key_prefix: str) -> None:
    fmd = {"name": "fmd", "eps": 2 / 255, "steps": 8}  # PGD: tens of ms per image, far over 0.001 ms
    srv = start_victim(
        tmp_path,
        tiers={"slow": {"rate": None, "defenses": [fmd]}, "fast": {"rate": None, "defenses": []}},
        keys={"thief": "slow", "honest": "fast"},
        redis_url=redis_url, key_prefix=key_prefix, extra={"defense_budget_ms": 0.001},
    )
    try:
        with srv.client() as c:
            for seed in range(3):
                for who in ("thief", "honest"):
                    r = c.post("/v1/models/denoise/translate", content=image_bytes(32, 32, seed=seed),
                               headers={**srv.headers(who), "Content-Type": "image/png"})
                    assert r.status_code == 200, r.text
            assert c.get("/healthz").status_code == 200
        metrics = httpx.get(f"{srv.url}/metrics").text
    finally:
        srv.stop()
    assert _over_budget(metrics, "fmd") == 3.0, "each of the three fmd requests ran over the 0.001 ms budget"
    assert "heist_defense_over_budget_total" in metrics
    assert len(re.findall(r"heist_defense_over_budget_total\{", metrics)) == 1, "only fmd ran, so one series"
    log = (srv.data_dir.parent / "server.log").read_text()
    assert re.search(r"defense fmd on model denoise took [0-9.]+ ms for 1 request\(s\): over the per-request "
                     r"defense budget of 0\.0 ms", log), log[-2000:]


def test_no_budget_counts_nothing(tmp_path: Path, redis_url: str, key_prefix: str) -> None:
    srv = start_victim(
        tmp_path, tiers={"slow": {"rate": None, "defenses": [{"name": "noise", "sigma": 0.01}]}},
        keys={"thief": "slow"}, redis_url=redis_url, key_prefix=key_prefix, extra={"defense_budget_ms": 60_000},
    )
    try:
        with srv.client() as c:
            r = c.post("/v1/models/denoise/translate", content=image_bytes(32, 32),
                       headers={**srv.headers("thief"), "Content-Type": "image/png"})
            assert r.status_code == 200, r.text
        metrics = httpx.get(f"{srv.url}/metrics").text
    finally:
        srv.stop()
    assert 'heist_defense_seconds_count{defense="noise"' in metrics.replace('model="denoise",', "")
    assert _over_budget(metrics, "noise") == 0.0
