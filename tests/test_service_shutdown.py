"""Stopping the service (SIGTERM) while requests run: every request gets a JSON answer and the query log
records what the client got."""

from __future__ import annotations

import concurrent.futures
import time
from pathlib import Path

import httpx

from tests.servers import image_bytes, start_victim, tiny_models
from victim_service.querylog import LogReader


def test_requests_cut_off_by_a_shutdown_get_json_and_are_logged_as_such(tmp_path: Path) -> None:
    """Requests still running when uvicorn's 5 s graceful shutdown ran out got a bare text/plain 500 and
    were logged as 499 client_closed (hung up), which they had not."""
    sr = tiny_models(tmp_path / "models", ("sr4x",))["sr4x"]
    srv = start_victim(tmp_path, models=[{"name": "sr4x", "source": str(sr), "max_batch": 1}],
                       extra={"query_log": {"backend": "jsonl"}, "torch_threads": 1})
    body = image_bytes(512, 512)  # seconds per request at batch 1 on a small CPU: 8 outlast the grace

    def send(_: int) -> httpx.Response:
        return httpx.post(f"{srv.url}/v1/models/sr4x/translate", content=body, timeout=60,
                          headers={"X-API-Key": srv.keys["bob"], "Content-Type": "image/png"})

    try:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(send, i) for i in range(8)]
            time.sleep(1.0)
            srv.process.stop(grace=30)
            answers = [f.result() for f in futures]
    finally:
        srv.stop()
    got = {r.headers["X-Request-Id"]: r.status_code for r in answers}
    for r in answers:
        assert r.status_code in (200, 503), (r.status_code, r.text)
        if r.status_code == 503:
            assert r.json()["error"] == "shutting_down"
            assert r.headers["Retry-After"] == "1"
    logged = {e.request_id: e.status for e in LogReader(srv.settings).iter_entries()}
    assert logged == got  # every answer logged once, with the status the client saw (no 499)
