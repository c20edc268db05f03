"""Schemathesis fuzzes the live server from its own OpenAPI document: no 5xx, responses match the schema.

The ``positive_data_acceptance`` check is left out on purpose: the schema can say "a PNG" but not "a PNG
at least 8 pixels wide", so schema-valid images are legitimately refused with 4xx. The translate route's
description says so, with this server's values (``test_translate_description_lists_what_is_refused``).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.servers import VictimServer, image_bytes, start_victim, tiny_models


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[VictimServer]:
    root = tmp_path_factory.mktemp("schema")
    models = tiny_models(root / "models", ("sr4x", "denoise"))
    server = start_victim(
        root,
        models=[{"name": n, "source": str(p), "max_batch": 4} for n, p in models.items()],
        tiers={"unlimited": {"rate": None}},
        keys={"fuzzer": "unlimited"},
        redis_url=redis_url,
        key_prefix=f"heist-test:{uuid.uuid4().hex[:12]}:",
    )
    yield server
    server.stop()


def _schemathesis() -> list[str]:
    exe = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.fail("schemathesis is not installed in this environment: pip install 'schemathesis>=4'")
    return [exe]


def _run(srv: VictimServer, key: str, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    cmd = [
        *_schemathesis(), "run", f"{srv.url}/openapi.json", "-H", f"X-API-Key: {key}",
        "--max-examples", "25", "--seed", "7", "--exclude-checks", "positive_data_acceptance",
        "--report-dir", str(tmp_path / "report"), "--no-color", *extra,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=tmp_path)


def test_openapi_is_clean(srv: VictimServer) -> None:
    spec = httpx.get(f"{srv.url}/openapi.json").json()
    op = spec["paths"]["/v1/models/{model}/translate"]["post"]
    assert set(op["requestBody"]["content"]) >= {"image/png", "image/jpeg", "image/webp", "multipart/form-data"}
    assert set(op["responses"]["200"]["content"]) == {"image/png", "image/jpeg", "image/webp"}
    assert {"401", "404", "406", "413", "415", "429", "503"} <= set(op["responses"])
    assert {"APIKeyHeader", "HTTPBearer"} <= set(spec["components"]["securitySchemes"])


def test_translate_description_lists_what_is_refused(srv: VictimServer) -> None:
    spec = httpx.get(f"{srv.url}/openapi.json").json()
    text = spec["paths"]["/v1/models/{model}/translate"]["post"]["description"]
    assert "Limits are checked in this order" in text  # the route's own docstring stays first
    assert "PNG, JPEG and WebP only" in text
    assert "415 `unsupported_format`" in text  # a GIF
    assert "400 `too_small` (a 1x1 image is refused" in text
    assert f"default {srv.settings.images.max_bytes}" in text
    models = {m["name"]: m for m in httpx.get(f"{srv.url}/v1/models").json()}
    for name, m in models.items():  # the live per-model limits, as GET /v1/models reports them
        row = f"| {name} | {m['min_side']} | {m['size_multiple']} | - | {m['max_pixels']} | {m['max_bytes']} |"
        assert row in text
    one_by_one = httpx.post(f"{srv.url}/v1/models/sr4x/translate", content=image_bytes(1, 1),
                            headers={**srv.headers("fuzzer"), "Content-Type": "image/png"})
    assert (one_by_one.status_code, one_by_one.json()["error"]) == (400, "too_small")
    gif = httpx.post(f"{srv.url}/v1/models/sr4x/translate", content=image_bytes(16, 16, "gif"),
                     headers={**srv.headers("fuzzer"), "Content-Type": "application/octet-stream"})
    assert (gif.status_code, gif.json()["error"]) == (415, "unsupported_format")


def test_schemathesis_finds_no_server_errors_as_a_client(srv: VictimServer, tmp_path: Path) -> None:
    res = _run(srv, srv.keys["fuzzer"], tmp_path, "--include-path-regex", "^/(v1/models|healthz|readyz|metrics)")
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-2000:]
    assert "passed" in res.stdout


def test_schemathesis_finds_no_server_errors_as_admin(srv: VictimServer, tmp_path: Path) -> None:
    res = _run(srv, srv.admin_key, tmp_path, "--include-path-regex", "^/v1/admin")
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-2000:]
    assert "Authentication failed" not in res.stdout  # the admin key opened every admin route
