"""The query log: what an entry holds for admitted and refused requests (Redis Stream), the perceptual
hash, and ``heist log tail`` / ``heist log export --format jsonl|parquet``."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pyarrow.parquet as pq
import pytest
import redis
import scipy.fft
import torch
from typer.testing import CliRunner

from heist.cli.main import app
from tests.conftest import free_port
from tests.servers import VictimServer, image_bytes, start_victim, tiny_models
from translators.codecs import decode_image, encode_image
from victim_service.phash import dct_matrix, hamming, phash64
from victim_service.querylog import LogReader, QueryLogEntry

# ---------------------------------------------------------------------------------------------- phash


def test_dct_matrix_is_scipys_orthonormal_dct() -> None:
    x = np.random.default_rng(0).random((32, 32))
    c = dct_matrix(32)
    assert np.allclose(c @ x @ c.T, scipy.fft.dctn(x, norm="ortho"))
    assert np.allclose(c @ c.T, np.eye(32))


def test_phash_is_stable_under_small_changes_and_differs_between_images() -> None:
    a = decode_image(image_bytes(96, 128, seed=1))
    b = decode_image(image_bytes(96, 128, seed=2))
    h = phash64(a)
    assert len(h) == 16
    assert int(h, 16) >= 0
    jpeg = decode_image(encode_image(a, "jpeg", quality=40))
    noisy = (a + 0.02 * torch.randn(a.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    smaller = torch.nn.functional.interpolate(a, size=(72, 96), mode="area")
    for near in (jpeg, noisy, smaller):
        assert hamming(h, phash64(near)) <= 6
    assert hamming(h, phash64(b)) >= 14
    assert hamming(h, h) == 0
    with pytest.raises(ValueError, match="lengths"):
        hamming(h, h[:8])


# ---------------------------------------------------------------------------------------------- entries


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[VictimServer]:
    root = tmp_path_factory.mktemp("log")
    models = tiny_models(root / "models", ("sr4x",))
    server = start_victim(
        root,
        models=[{"name": "sr4x", "source": str(models["sr4x"]), "max_batch": 1,
                 "defenses": [{"name": "noise", "sigma": 0.01}]}],
        tiers={"free": {"rate": 0.01, "burst": 2}},
        keys={"alice": "free", "bob": "free"},
        redis_url=redis_url,
        key_prefix=f"heist-test:{uuid.uuid4().hex[:12]}:",
        extra={"query_log": {"store_images": True}},
    )
    yield server
    server.stop()


def _wait_entries(srv: VictimServer, n: int) -> list[QueryLogEntry]:
    reader = LogReader(srv.settings)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        got = list(reader.iter_entries())
        if len(got) >= n:
            return got
        time.sleep(0.05)
    raise AssertionError(f"expected {n} log entries, found {len(list(reader.iter_entries()))}")


PNG = image_bytes(24, 32, seed=9)


@pytest.fixture(scope="module")
def traffic(srv: VictimServer) -> dict[str, httpx.Response]:
    """Two admitted requests, then one rate-limited, one with a bad key and one bad image."""
    url = f"{srv.url}/v1/models/sr4x/translate"
    png = {"Content-Type": "image/png"}
    out = {
        "ok0": httpx.post(url, content=PNG, headers={**srv.headers("alice"), **png}),
        "ok1": httpx.post(url, content=PNG, headers={**srv.headers("alice"), **png}),
        "limited": httpx.post(url, content=PNG, headers={**srv.headers("alice"), **png}),
        "anonymous": httpx.post(url, content=PNG, headers={"X-API-Key": "hk_wrong_key_0123456789", **png}),
        "bad": httpx.post(url, content=b"junk", headers={**srv.headers("bob"), **png}),
    }
    assert [r.status_code for r in out.values()] == [200, 200, 429, 401, 400]
    _wait_entries(srv, 5)
    return out


def test_admitted_and_refused_requests_are_logged(srv: VictimServer, traffic: dict[str, httpx.Response]) -> None:
    png = PNG
    ok = [traffic["ok0"], traffic["ok1"]]
    limited, anonymous, bad = traffic["limited"], traffic["anonymous"], traffic["bad"]
    entries = {e.request_id: e for e in _wait_entries(srv, 5)}
    digest = hashlib.sha256(png).hexdigest()

    e = entries[ok[0].headers["x-request-id"]]
    assert (e.client, e.tier, e.model, e.status, e.code) == ("alice", "free", "sr4x", 200, "ok")
    assert e.input_sha256 == digest
    assert e.phash == phash64(decode_image(png))
    assert (e.width, e.height, e.bytes_in, e.bytes_out) == (32, 24, len(png), len(ok[0].content))
    assert e.defenses == ["noise(sigma=0.01,kind=gaussian,per_input=False)"]
    assert e.latency_ms > 0
    assert e.queue_ms is not None
    assert e.batch_size == 1
    assert e.ip == "127.0.0.1"
    assert e.content_type == "image/png"
    assert e.key_id == hashlib.sha256(srv.keys["alice"].encode()).hexdigest()[:12]
    assert e.image_path is not None
    assert Path(e.image_path).read_bytes() == png

    e = entries[limited.headers["x-request-id"]]
    assert (e.client, e.status, e.code, e.input_sha256, e.bytes_in) == ("alice", 429, "rate_limited", digest, len(png))
    assert e.phash is None
    assert e.defenses == []

    e = entries[anonymous.headers["x-request-id"]]
    assert (e.client, e.status, e.code, e.input_sha256) == (None, 401, "unauthorized", None)
    assert e.key_id == hashlib.sha256(b"hk_wrong_key_0123456789").hexdigest()[:12]

    e = entries[bad.headers["x-request-id"]]
    assert (e.client, e.status, e.code, e.bytes_in) == ("bob", 400, "not_an_image", 4)

    stream = redis.Redis.from_url(srv.redis_url or "").xrange(f"{srv.key_prefix}querylog")
    assert len(stream) == 5
    assert set(stream[0][1]) == {b"e"}


def test_log_cli_tail_and_export_jsonl_and_parquet(
    srv: VictimServer, traffic: dict[str, httpx.Response], tmp_path: Path
) -> None:
    entries = _wait_entries(srv, 5)
    runner = CliRunner()
    cfg = ["--config", str(srv.settings_path)]
    tail = runner.invoke(app, ["log", "tail", "-n", "3", "--json", *cfg])
    assert tail.exit_code == 0, tail.output
    lines = [json.loads(x) for x in tail.stdout.strip().splitlines()]
    assert [x["request_id"] for x in lines] == [e.request_id for e in entries[-3:]]
    alice = runner.invoke(app, ["log", "tail", "--client", "alice", "--json", *cfg])
    assert {json.loads(x)["client"] for x in alice.stdout.strip().splitlines()} == {"alice"}

    out = tmp_path / "log.jsonl"
    res = runner.invoke(app, ["log", "export", "--format", "jsonl", "--out", str(out), *cfg])
    assert res.exit_code == 0, res.output
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["request_id"] for r in rows] == [e.request_id for e in entries]

    pq_out = tmp_path / "log.parquet"
    res = runner.invoke(app, ["log", "export", "--out", str(pq_out), "--client", "alice", *cfg])  # format by suffix
    assert res.exit_code == 0, res.output
    table = pq.read_table(pq_out)
    assert table.num_rows == sum(1 for e in entries if e.client == "alice") == 3
    assert table.column("status").to_pylist() == [200, 200, 429]
    assert table.column("defenses").to_pylist()[0] == ["noise(sigma=0.01,kind=gaussian,per_input=False)"]
    assert {"ts", "client", "input_sha256", "phash", "latency_ms", "request_id"} <= set(table.column_names)

    recent = runner.invoke(app, ["log", "export", "--format", "jsonl", "--out", str(tmp_path / "n.jsonl"),
                                 "--since", "2030-01-01", *cfg])
    assert recent.exit_code == 0
    assert (tmp_path / "n.jsonl").read_text() == ""

    mixed = runner.invoke(app, ["log", "export", "--format", "jsonl", "--out", str(tmp_path / "m.parquet"), *cfg])
    assert mixed.exit_code != 0
    assert not (tmp_path / "m.parquet").exists()
    assert "names a parquet file but --format is jsonl" in str(mixed.exception)
    assert runner.invoke(app, ["log", "tail", "-n", "0", *cfg]).exit_code == 2
    nobody = runner.invoke(app, ["log", "tail", "--client", "no one", *cfg])  # was an empty table
    assert nobody.exit_code != 0
    assert "--client: client name 'no one' must be 1-64 characters" in str(nobody.exception)

    folder = tmp_path / "exports"
    folder.mkdir()
    bad = runner.invoke(app, ["log", "export", "--out", str(folder), *cfg])  # was a traceback + a stray temp file
    assert bad.exit_code != 0
    assert "is a folder; name the file to write" in str(bad.exception)
    assert not list(tmp_path.glob(".*tmp*"))


def test_admin_log_route_reads_the_stream(srv: VictimServer, traffic: dict[str, httpx.Response]) -> None:
    got = httpx.get(f"{srv.url}/v1/admin/clients/bob/log", params={"limit": 5}, headers=srv.admin_headers)
    assert got.status_code == 200
    assert [(e["client"], e["code"]) for e in got.json()] == [("bob", "not_an_image")]
    bad = httpx.get(f"{srv.url}/v1/admin/log", params={"limit": 0}, headers=srv.admin_headers)
    assert bad.status_code == 422
    assert bad.json()["error"] == "invalid_request"
    for url, params in ((f"{srv.url}/v1/admin/clients/no%20one/log", {}), (f"{srv.url}/v1/admin/log",
                                                                            {"client": "no one"})):
        named = httpx.get(url, params=params, headers=srv.admin_headers)  # was 200 [] for a name no key can have
        assert named.status_code == 400, named.text
        assert named.json()["error"] == "bad_client"


def test_log_cli_says_in_one_line_that_redis_is_unreachable(srv: VictimServer, tmp_path: Path) -> None:
    dead = ["--config", str(srv.settings_path), "--redis-url", f"redis://127.0.0.1:{free_port()}/0"]
    for args in (["log", "tail", "-n", "2"], ["log", "export", "--out", str(tmp_path / "q.jsonl")]):
        res = subprocess.run([sys.executable, "-c", "from heist.cli.main import main; main()", *args, *dead],
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 2, res.stderr
        assert res.stderr.startswith("error: the query log (Redis) is unreachable"), res.stderr
        assert "Traceback" not in res.stderr
    assert not (tmp_path / "q.jsonl").exists()


def test_entries_replayed_after_an_outage_are_read_by_their_own_time(redis_url: str, tmp_path: Path) -> None:
    """Entries spilled while Redis was down enter the stream when it returns, after newer ones: `heist log
    tail` showed them as the latest and `export --since` let older ones through (it went by stream ID)."""
    from victim_service.settings import Settings

    settings = Settings.from_mapping({"redis_url": redis_url, "key_prefix": f"heist-test:{uuid.uuid4().hex[:12]}:",
                                      "data_dir": str(tmp_path)}, env=False)
    reader = LogReader(settings)
    r = redis.Redis.from_url(redis_url)
    now = time.time()

    def add(ts: float, rid: str) -> None:
        e = QueryLogEntry(ts=ts, request_id=rid, client="c", status=200, code="ok")
        r.xadd(reader.key, {b"e": e.model_dump_json()})

    try:
        add(now - 100, "before-outage")
        add(now - 5, "latest")  # answered once Redis was back...
        for i in range(3):  # ...before the spill of the outage was replayed
            add(now - 60 + i, f"spilled-{i}")
        assert [e.request_id for e in reader.tail(2)] == ["spilled-2", "latest"]
        assert [e.request_id for e in reader.iter_entries(since=now - 30)] == ["latest"]
        assert len(list(reader.iter_entries(since=now - 80))) == 4
    finally:
        r.delete(reader.key)
