"""The victim API end to end against a real uvicorn server and real Redis: routes, auth, formats,
model list, TorchScript from a models dir, dynamic batching (correct outputs, real batches, bounded
queue) and the auto batch-size probe."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from tests.servers import VictimServer, image_bytes, start_victim, tiny_models, tiny_torchscript
from translators.archs import build_arch
from translators.checkpoint import load_model
from translators.codecs import decode_image
from translators.images import to_uint8

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")  # tiny TorchScript test models


@pytest.fixture(scope="module")
def paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("api")
    models = tiny_models(root / "models")
    drop = root / "dropped"
    tiny_torchscript(drop, "scripted")
    torch.manual_seed(0)
    exported = build_arch("dncnn", {"channels": 4, "depth": 2}).eval()
    torch.export.save(torch.export.export(exported, (torch.rand(1, 3, 24, 24),)), str(drop / "exported.pt2"))
    return {"root": root, "drop": drop, **models}


@pytest.fixture(scope="module")
def srv(paths: dict[str, Path], redis_url: str) -> Iterator[VictimServer]:
    import uuid

    server = start_victim(
        paths["root"],
        models=[
            {"name": "sr4x", "source": str(paths["sr4x"]), "max_batch": 4, "max_delay_ms": 30},
            {"name": "denoise", "source": str(paths["denoise"]), "max_batch": 4, "max_delay_ms": 60},
            {"name": "unet8", "source": str(paths["unet8"]), "max_batch": 1},
            {"name": "auto", "source": str(paths["denoise"]), "max_batch": "auto", "max_batch_limit": 4,
             "probe_size": 32},
            {"name": "tinyq", "source": str(paths["denoise"]), "max_batch": 8, "max_delay_ms": 1500,
             "max_queue": 2},
        ],
        models_dir=paths["drop"],
        tiers={"free": {"rate": 1.0, "burst": 3}, "unlimited": {"rate": None}},
        keys={"alice": "free", "bob": "unlimited"},
        redis_url=redis_url,
        key_prefix=f"heist-test:{uuid.uuid4().hex[:12]}:",
    )
    yield server
    server.stop()


def post(srv: VictimServer, model: str, body: bytes, who: str = "bob", ctype: str = "image/png",
         **headers: str) -> httpx.Response:
    h = {"Content-Type": ctype, **({"X-API-Key": srv.keys[who]} if who else {}), **headers}
    return httpx.post(f"{srv.url}/v1/models/{model}/translate", content=body, headers=h, timeout=30)


def local_forward(path: Path, png: bytes) -> torch.Tensor:
    """What the server should answer: the checkpoint run here on the decoded input, as uint8."""
    m = load_model(path)
    with torch.inference_mode():
        y = m.module(decode_image(png))
    return torch.from_numpy(to_uint8(y)).int()


def as_uint8(body: bytes) -> torch.Tensor:
    return torch.from_numpy(to_uint8(decode_image(body))).int()


# ---------------------------------------------------------------------------------------------- basics


def test_health_ready_and_model_list_without_architecture(srv: VictimServer) -> None:
    health = httpx.get(f"{srv.url}/healthz").json()
    assert health["status"] == "ok"
    assert health["store"]["backend"] == "redis"
    assert health["store"]["key_prefix"] == srv.key_prefix
    ready = httpx.get(f"{srv.url}/readyz")
    assert ready.status_code == 200
    assert ready.json()["redis"] == "ok"
    models = {m["name"]: m for m in httpx.get(f"{srv.url}/v1/models").json()}
    assert set(models) == {"sr4x", "denoise", "unet8", "auto", "tinyq", "scripted", "exported"}
    sr = models["sr4x"]
    assert (sr["task"], sr["scale"], sr["min_side"], sr["max_batch"]) == ("sr", 4, 8, 4)
    assert sr["max_pixels"] == 2048 * 2048 // 16
    assert models["unet8"]["size_multiple"] == 8
    assert models["scripted"]["scale"] == 1
    assert models["scripted"]["task"] == "translation"
    text = httpx.get(f"{srv.url}/v1/models").text.lower()
    for secret in ("srresnet", "dncnn", "unet\"", "arch", "kwargs", "safetensors", str(srv.data_dir).lower()):
        assert secret not in text, f"/v1/models leaks {secret!r}"


def test_translate_raw_png_matches_the_model(srv: VictimServer, paths: dict[str, Path]) -> None:
    png = image_bytes(24, 20, seed=1)
    r = post(srv, "sr4x", png)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png"
    assert re.fullmatch(r"[0-9a-f]{32}", r.headers["x-request-id"])
    out = as_uint8(r.content)
    assert out.shape == (96, 80, 3)
    assert (out - local_forward(paths["sr4x"], png)).abs().max() <= 1


def test_translate_multipart_jpeg_and_webp_inputs(srv: VictimServer, paths: dict[str, Path]) -> None:
    for fmt in ("png", "jpeg", "webp"):
        data = image_bytes(16, 16, fmt, seed=2)
        r = httpx.post(f"{srv.url}/v1/models/denoise/translate", files={"image": (f"x.{fmt}", data)},
                       headers={"X-API-Key": srv.keys["bob"]})
        assert r.status_code == 200, (fmt, r.text)
        assert (as_uint8(r.content) - local_forward(paths["denoise"], data)).abs().max() <= 1
    raw = post(srv, "denoise", image_bytes(16, 16, "jpeg"), ctype="image/jpeg")
    assert raw.status_code == 200


@pytest.mark.parametrize(("accept", "ctype"), [
    (None, "image/png"), ("*/*", "image/png"), ("image/*", "image/png"), ("image/jpeg", "image/jpeg"),
    ("image/webp", "image/webp"), ("image/webp;q=0.5, image/jpeg", "image/jpeg"), ("image/jpg", "image/jpeg"),
    ("text/html, image/webp;q=0.9", "image/webp"),
])
def test_accept_picks_the_output_format(srv: VictimServer, accept: str | None, ctype: str) -> None:
    extra = {"Accept": accept} if accept is not None else {}
    r = post(srv, "denoise", image_bytes(16, 16), **extra)
    assert r.status_code == 200
    assert r.headers["content-type"] == ctype
    assert decode_image(r.content).shape == (1, 3, 16, 16)


def test_grayscale_rgba_16bit_and_palette_inputs_are_converted(srv: VictimServer) -> None:
    for mode in ("L", "LA", "RGBA", "P", "I;16"):
        r = post(srv, "denoise", image_bytes(16, 24, mode=mode))
        assert r.status_code == 200, (mode, r.text)
        assert decode_image(r.content).shape == (1, 3, 16, 24)


# ---------------------------------------------------------------------------------------------- auth


def test_auth_missing_bad_and_bearer_keys(srv: VictimServer) -> None:
    png = image_bytes(16, 16)
    missing = post(srv, "denoise", png, who="")
    assert missing.status_code == 401
    assert missing.json()["error"] == "unauthorized"
    bad = post(srv, "denoise", png, who="", **{"X-API-Key": "hk_not_a_real_key_123456"})
    assert bad.status_code == 401
    assert bad.json() == {"error": "unauthorized", "detail": "invalid API key"}
    bearer = post(srv, "denoise", png, who="", Authorization=f"Bearer {srv.keys['bob']}")
    assert bearer.status_code == 200
    wrong_scheme = post(srv, "denoise", png, who="", Authorization=f"Basic {srv.keys['bob']}")
    assert wrong_scheme.status_code == 401
    admin_as_client = post(srv, "denoise", png, who="", **{"X-API-Key": srv.admin_key})
    assert admin_as_client.status_code == 401


def test_admin_routes_need_the_admin_key_and_new_keys_work_at_once(srv: VictimServer) -> None:
    for h in ({}, srv.headers("bob")):
        r = httpx.get(f"{srv.url}/v1/admin/log", headers=h)
        assert r.status_code == 401
        assert r.json()["error"] == "unauthorized"
    made = httpx.post(f"{srv.url}/v1/admin/keys", json={"name": "carol", "tier": "unlimited"},
                      headers=srv.admin_headers)
    assert made.status_code == 201, made.text
    key = made.json()["key"]
    assert post(srv, "denoise", image_bytes(16, 16), who="", **{"X-API-Key": key}).status_code == 200
    dup = httpx.post(f"{srv.url}/v1/admin/keys", json={"name": "carol", "tier": "unlimited"},
                     headers=srv.admin_headers)
    assert dup.status_code == 400
    assert "already has a key" in dup.json()["detail"]
    bad_tier = httpx.post(f"{srv.url}/v1/admin/keys", json={"name": "dan", "tier": "gold"},
                          headers=srv.admin_headers)
    assert bad_tier.status_code == 400
    assert bad_tier.json()["error"] == "unknown_tier"
    bad_name = httpx.post(f"{srv.url}/v1/admin/keys", json={"name": "dan smith", "tier": "unlimited"},
                          headers=srv.admin_headers)
    assert bad_name.status_code == 422
    assert "client name 'dan smith' must be 1-64 characters" in bad_name.json()["detail"]  # not a raw regex
    log = httpx.get(f"{srv.url}/v1/admin/clients/carol/log", headers=srv.admin_headers).json()
    assert [e["client"] for e in log] == ["carol"]
    assert log[0]["status"] == 200
    assert httpx.post(f"{srv.url}/v1/admin/keys/reload", headers=srv.admin_headers).json()["dropped"] >= 1


def test_admin_revokes_a_key_at_once_and_the_name_can_have_a_new_one(srv: VictimServer) -> None:
    made = httpx.post(f"{srv.url}/v1/admin/keys", json={"name": "erin", "tier": "unlimited"},
                      headers=srv.admin_headers)
    key = made.json()["key"]
    assert post(srv, "denoise", image_bytes(16, 16), who="", **{"X-API-Key": key}).status_code == 200  # cached
    assert httpx.delete(f"{srv.url}/v1/admin/clients/erin/key", headers=srv.headers("bob")).status_code == 401
    gone = httpx.delete(f"{srv.url}/v1/admin/clients/erin/key", headers=srv.admin_headers)
    assert gone.status_code == 200, gone.text
    assert gone.json() == {"revoked": "erin"}
    refused = post(srv, "denoise", image_bytes(16, 16), who="", **{"X-API-Key": key})
    assert refused.status_code == 401, refused.text
    again = httpx.delete(f"{srv.url}/v1/admin/clients/erin/key", headers=srv.admin_headers)
    assert (again.status_code, again.json()["error"]) == (404, "no_key")
    bad = httpx.delete(f"{srv.url}/v1/admin/clients/erin%20smith/key", headers=srv.admin_headers)
    assert (bad.status_code, bad.json()["error"]) == (400, "bad_client")
    renewed = httpx.post(f"{srv.url}/v1/admin/keys", json={"name": "erin", "tier": "unlimited"},
                         headers=srv.admin_headers)
    assert renewed.status_code == 201, renewed.text
    assert post(srv, "denoise", image_bytes(16, 16), who="", **{"X-API-Key": renewed.json()["key"]}).status_code == 200


def test_unknown_route_and_model_are_json_404(srv: VictimServer) -> None:
    r = post(srv, "nope", image_bytes(16, 16))
    assert r.status_code == 404
    assert r.json()["error"] == "unknown_model"
    r = httpx.get(f"{srv.url}/v2/whatever")
    assert r.status_code == 404
    assert r.json()["error"] == "not_found"
    r = httpx.get(f"{srv.url}/v1/models/denoise/translate")
    assert r.status_code == 405
    assert r.json()["error"] == "method_not_allowed"


# ---------------------------------------------------------------------------------------------- models dir


def test_torchscript_dropped_in_models_dir_is_served(srv: VictimServer, paths: dict[str, Path]) -> None:
    png = image_bytes(20, 28, seed=5)
    r = post(srv, "scripted", png)
    assert r.status_code == 200, r.text
    out = as_uint8(r.content)
    assert out.shape == (20, 28, 3)
    assert (out - local_forward(paths["drop"] / "scripted.pt", png)).abs().max() <= 1


def test_an_export_traced_with_one_image_is_served_one_at_a_time(srv: VictimServer) -> None:
    """The usual torch.export (static shapes, batch 1) crashed the batch probe at start-up, and with a fixed
    max_batch every request batched with another got a 500."""
    info = {m["name"]: m for m in httpx.get(f"{srv.url}/v1/models", timeout=10).json()}["exported"]
    assert info["max_batch"] == 1
    rs = asyncio.run(_concurrent(srv, "exported", [image_bytes(24, 24, seed=i) for i in range(4)]))
    assert [r.status_code for r in rs] == [200] * 4, [r.text for r in rs]
    assert post(srv, "exported", image_bytes(20, 28)).json()["error"] == "bad_size"


# ---------------------------------------------------------------------------------------------- batching


async def _concurrent(srv: VictimServer, model: str, bodies: list[bytes]) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=60) as c:
        return await asyncio.gather(*[
            c.post(f"{srv.url}/v1/models/{model}/translate", content=b,
                   headers={"X-API-Key": srv.keys["bob"], "Content-Type": "image/png"})
            for b in bodies
        ])


def _metric(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith(f"{name}{{{want}}} ") or (not labels and line.startswith(f"{name} ")):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_dynamic_batching_stacks_same_shapes_and_keeps_every_output_its_own(
    srv: VictimServer, paths: dict[str, Path]
) -> None:
    before = httpx.get(f"{srv.url}/metrics").text
    same = [image_bytes(16, 16, seed=100 + i) for i in range(8)]
    mixed = [image_bytes(16 + 8 * (i % 3), 16, seed=200 + i) for i in range(6)]
    responses = asyncio.run(_concurrent(srv, "denoise", same + mixed))
    assert [r.status_code for r in responses] == [200] * 14
    for body, r in zip(same + mixed, responses):
        assert (as_uint8(r.content) - local_forward(paths["denoise"], body)).abs().max() <= 1
    after = httpx.get(f"{srv.url}/metrics").text
    n_batches = _metric(after, "heist_batch_size_count", model="denoise") - _metric(
        before, "heist_batch_size_count", model="denoise")
    n_images = _metric(after, "heist_batch_size_sum", model="denoise") - _metric(
        before, "heist_batch_size_sum", model="denoise")
    assert n_images == 14
    assert n_batches <= 10, f"14 concurrent requests ran in {n_batches} batches: no batching happened"
    big = _metric(after, "heist_batch_size_bucket", model="denoise", le="4.0") - _metric(
        after, "heist_batch_size_bucket", model="denoise", le="1.0")
    assert big >= 1


def test_bounded_queue_answers_503_overloaded(srv: VictimServer) -> None:
    # tinyq: max_queue 2 and a 1.5 s batching delay, so the first two wait while the rest arrive
    responses = asyncio.run(_concurrent(srv, "tinyq", [image_bytes(16, 16, seed=i) for i in range(5)]))
    codes = sorted(r.status_code for r in responses)
    assert codes == [200, 200, 503, 503, 503]
    refused = [r for r in responses if r.status_code == 503]
    assert all(r.json()["error"] == "overloaded" and r.headers["retry-after"] == "1" for r in refused)


def test_auto_batch_size_is_measured_and_shown(srv: VictimServer) -> None:
    auto = next(m for m in httpx.get(f"{srv.url}/v1/models").json() if m["name"] == "auto")
    assert auto["max_batch_source"] == "auto"
    assert auto["max_batch"] in (1, 2, 4)
    log = (srv.settings_path.parent / "server.log").read_text()
    assert re.search(r"model auto on cpu: max_batch=\d chosen by measurement at 32x32 \(img/s by batch: 1: ", log)
