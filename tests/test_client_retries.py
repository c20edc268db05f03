"""The one retry policy for a victim query (:meth:`attacker.client.VictimClient.translate_retrying`) and the
admin client, against a real uvicorn server.

The server is a tiny FastAPI app started here (in a thread, on a free port) whose translate endpoint plays a
script chosen by the API key: ``503x2`` answers 503 twice then echoes the PNG, ``quota`` answers 429
``quota_exhausted``, and so on. It counts the requests per key, so each test checks how many requests the
real client sent. Callers checked too: the membership attack, :class:`HttpTranslator`, benign customers,
and ``verify_url`` (``heist defend verify --suspect URL``) surviving one 503.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
import torch
import uvicorn
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse

from attacker.benign import BenignClient, BenignRequest, run_benign
from attacker.client import AdminApiError, ClientConfig, Outcome, VictimAdminClient, VictimClient
from attacker.errors import (
    InputsRefusedError,
    QuotaExhaustedError,
    UnauthorizedError,
    VictimFailingError,
    VictimUnreachableError,
)
from attacker.mia import Candidate, query_outputs
from evaluation.campaign.victim import HttpTranslator, VictimError
from evaluation.watermark import Probe, verify_url
from tests.conftest import free_port
from translators.codecs import decode_image, encode_image

MODEL = "echo"
ADMIN = "hk_admin_test"
FAST = ClientConfig(max_retries=2, backoff_base_s=0.01, backoff_max_s=0.05)


def _err(status: int, code: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": code, "detail": f"scripted {code}"}, status_code=status, headers=headers)


# key -> what the n-th request (0-based) of that key gets; None: the PNG echoed back
SCRIPTS: dict[str, list[JSONResponse | None]] = {}


def _script(key: str, n: int) -> JSONResponse | None:
    if key.startswith("fail"):  # "failN": N times 503 overloaded (Retry-After-Ms 20), then answers
        return _err(503, "overloaded", {"Retry-After-Ms": "20"}) if n < int(key[4:]) else None
    if key == "always503":
        return _err(503, "overloaded", {"Retry-After-Ms": "10"})
    if key == "shutdown1s":  # the real server's 503 shutting_down / overloaded carry whole seconds
        return _err(503, "shutting_down", {"Retry-After": "1"}) if n == 0 else None
    if key == "rate1s":
        return _err(429, "rate_limited", {"Retry-After": "1"}) if n == 0 else None
    if key == "rate_forever":
        return _err(429, "rate_limited", {"Retry-After-Ms": "10"})
    if key == "quota":
        return _err(429, "quota_exhausted", {"Retry-After": "3600"})
    if key == "unauth":
        return _err(401, "unauthorized")
    if key == "refuse":
        return _err(400, "not_an_image")
    return None


def _app(counts: Counter[str]) -> FastAPI:
    app = FastAPI()

    @app.get("/v1/models")
    async def models() -> list[dict[str, object]]:
        return [{"name": MODEL, "task": "denoise", "scale": 1, "min_side": 8}]

    @app.post("/v1/models/{model}/translate")
    async def translate(model: str, request: Request) -> Response:
        key = request.headers.get("x-api-key", "")
        n = counts[key]
        counts[key] += 1
        if model != MODEL:
            return _err(404, "unknown_model")
        scripted = _script(key, n)
        if scripted is not None:
            return scripted
        return Response(await request.body(), media_type="image/png")

    @app.get("/v1/admin/clients")
    async def clients(request: Request) -> Response:
        if request.headers.get("x-api-key") != ADMIN:
            return _err(401, "unauthorized")
        return JSONResponse({"enabled": True, "clients": [{"client": "alice", "risk": 0.5}]})

    @app.post("/v1/admin/keys")
    async def add_key(request: Request) -> Response:
        body = await request.json()
        if body["tier"] != "free":
            return _err(400, "unknown_tier")
        return JSONResponse({"name": body["name"], "tier": body["tier"], "key": f"hk_{body['name']}"},
                            status_code=201)

    return app


@dataclass
class FakeVictim:
    url: str
    counts: Counter[str] = field(default_factory=Counter)


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeVictim]:
    counts: Counter[str] = Counter()
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(_app(counts), host="127.0.0.1", port=port, log_level="warning",
                                           lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "the fake victim did not start"
        time.sleep(0.02)
    try:
        yield FakeVictim(f"http://127.0.0.1:{port}", counts)
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture(autouse=True)
def _fresh_counts(fake: FakeVictim) -> None:
    fake.counts.clear()


PNG = encode_image(torch.rand(1, 3, 16, 16))


def _ask(url: str, key: str, config: ClientConfig = FAST, **kw: object) -> Outcome:
    async def go() -> Outcome:
        async with VictimClient(url, config) as c:
            return await c.translate_retrying(MODEL, key, PNG, **kw)  # type: ignore[arg-type]

    return asyncio.run(go())


def test_transient_503s_are_retried_and_the_answer_returned(fake: FakeVictim) -> None:
    out = _ask(fake.url, "fail2")
    assert out.ok
    assert out.body == PNG
    assert out.attempts == 3 == fake.counts["fail2"]


def test_503s_are_retried_up_to_max_retries_then_a_typed_error(fake: FakeVictim) -> None:
    with pytest.raises(VictimFailingError, match=r"failed 3 times.*503 overloaded"):
        _ask(fake.url, "always503")
    assert fake.counts["always503"] == 3  # the first try + max_retries
    out = _ask(fake.url, "always503", ClientConfig(max_retries=0), check=False)
    assert (out.status, out.code, out.attempts) == (503, "overloaded", 1)


def test_max_retries_zero_does_not_retry(fake: FakeVictim) -> None:
    with pytest.raises(VictimFailingError):
        _ask(fake.url, "fail1", ClientConfig(max_retries=0))
    assert fake.counts["fail1"] == 1


def test_a_503_retry_after_is_honoured(fake: FakeVictim) -> None:
    t0 = time.monotonic()
    out = _ask(fake.url, "shutdown1s")
    assert out.ok
    assert out.attempts == 2
    assert time.monotonic() - t0 >= 0.95  # Retry-After: 1, though the backoff alone is <= 0.05 s


def test_transport_errors_are_retried_then_unreachable() -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(VictimUnreachableError, match="cannot reach"):
        _ask(dead, "any")
    out = _ask(dead, "any", check=False)
    assert out.status is None
    assert out.attempts == 3


def test_429_waits_retry_after_then_asks_again(fake: FakeVictim) -> None:
    t0 = time.monotonic()
    out = _ask(fake.url, "rate1s")
    assert out.ok
    assert out.attempts == 2 == fake.counts["rate1s"]
    assert time.monotonic() - t0 >= 0.95
    with pytest.raises(VictimFailingError, match="still rate limited"):
        _ask(fake.url, "rate_forever", max_rate_waits=3)
    assert fake.counts["rate_forever"] == 4


def test_429_waits_are_bounded(fake: FakeVictim) -> None:
    t0 = time.monotonic()
    out = _ask(fake.url, "rate1s", max_wait_s=0.1)
    assert out.ok
    assert time.monotonic() - t0 < 0.9


@pytest.mark.parametrize(("key", "error", "needle"), [
    ("quota", QuotaExhaustedError, "no quota left"),
    ("unauth", UnauthorizedError, "refused API key"),
    ("refuse", InputsRefusedError, "not_an_image"),
])
def test_refusals_stop_at_once(fake: FakeVictim, key: str, error: type[Exception], needle: str) -> None:
    with pytest.raises(error, match=needle):
        _ask(fake.url, key)
    assert fake.counts[key] == 1
    out = _ask(fake.url, key, check=False)
    assert out.status in (429, 401, 400)
    assert out.attempts == 1


def test_membership_attack_retries_a_transient_503(fake: FakeVictim) -> None:
    cands = [Candidate(f"c{i}", torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 16)) for i in range(2)]
    outputs, sent = query_outputs(fake.url, "fail1", MODEL, cands, concurrency=1)
    assert set(outputs) == {"c0", "c1"}
    assert sent == 3 == fake.counts["fail1"]
    with pytest.raises(QuotaExhaustedError, match="membership inference needs 2 queries"):
        query_outputs(fake.url, "quota", MODEL, cands, concurrency=1)
    assert fake.counts["quota"] == 1


def test_http_translator_retries_and_counts_requests(fake: FakeVictim) -> None:
    x = torch.rand(1, 3, 16, 16)
    with HttpTranslator(fake.url, MODEL, "fail1", retries=2) as victim:
        y = victim(x)
        assert y.shape == x.shape
        assert victim.requests == 2
    with HttpTranslator(fake.url, MODEL, "quota") as victim, pytest.raises(VictimError, match="no quota left"):
        victim(x)
    assert fake.counts["quota"] == 1  # a used-up quota is not waited out
    with HttpTranslator(fake.url, MODEL, "always503", retries=1) as victim, pytest.raises(VictimError):
        victim(x)
    assert victim.requests == 2 == fake.counts["always503"]


def test_benign_customers_record_refusals_and_retry_5xx(fake: FakeVictim) -> None:
    req = BenignRequest(0.0, PNG, "image/png", "p", "new")
    plan = [BenignClient("a", [req]), BenignClient("b", [req, req])]
    res = asyncio.run(run_benign(fake.url, MODEL, {"a": "quota", "b": "fail1"}, plan, time_scale=0, config=FAST))
    assert [(o.status, o.code) for o in res["a"]] == [(429, "quota_exhausted")]
    assert [o.status for o in res["b"]] == [200, 200]
    assert [o.attempts for o in res["b"]] == [2, 1]


def test_watermark_verify_against_a_url_survives_one_503(fake: FakeVictim) -> None:
    g = torch.Generator().manual_seed(0)
    probes = [Probe(f"p{i}", torch.rand(1, 3, 64, 64, generator=g).mul(255).round().div(255)) for i in range(4)]
    res = verify_url(fake.url, MODEL, "fail1", lambda x: x, probes, secret=1234)
    assert fake.counts["fail1"] == len(probes) + 1
    assert res["probes"] == len(probes)
    assert 0.0 <= res["p_value"] <= 1.0


def test_admin_client_parses_errors(fake: FakeVictim) -> None:
    async def go() -> None:
        async with VictimAdminClient(fake.url, ADMIN) as admin:
            assert (await admin.clients())["alice"]["risk"] == 0.5
            assert await admin.create_key("bob", "free") == "hk_bob"
            with pytest.raises(AdminApiError, match="HTTP 400 unknown_tier: scripted unknown_tier") as err:
                await admin.create_key("bob", "gold")
            assert (err.value.status, err.value.error) == (400, "unknown_tier")
        async with VictimAdminClient(fake.url, "wrong") as admin:
            with pytest.raises(AdminApiError, match="401 unauthorized"):
                await admin.clients_status()
        async with VictimAdminClient(f"http://127.0.0.1:{free_port()}", ADMIN) as admin:
            with pytest.raises(VictimUnreachableError, match="cannot reach"):
                await admin.clients()

    asyncio.run(go())


def test_decoded_echo_is_the_sent_image(fake: FakeVictim) -> None:
    out = _ask(fake.url, "fail0")
    assert torch.equal(decode_image(out.body), decode_image(PNG))
