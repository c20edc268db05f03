"""The per-request defense policy against a real server (uvicorn + Redis): levels per client set through the
admin route, the query log records the defenses the batcher applied, config validation, EXIF orientation,
and ``heist serve --models-dir DIR --defense SPEC``."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from defenses import DEFENSE_REGISTRY, DefenseConfigError, parse_defense_spec
from tests.conftest import free_port
from tests.servers import image_bytes, start_victim, tiny_models, write_settings
from translators.codecs import decode_image
from victim_service.settings import Settings, SettingsError

NOISE_STRONG = {"name": "noise", "sigma": 0.05, "per_input": True}
LEVELS = [
    [{"name": "noise", "sigma": 0.01}],  # level 1 adds noise
    [NOISE_STRONG, {"name": "jpeg", "quality": 50}],  # level 2 strengthens it and adds JPEG
]


def test_registry_is_complete_after_import_and_specs_parse() -> None:
    assert {"jpeg", "noise", "trace_watermark", "fmd", "feature_amplify", "poison"} <= set(DEFENSE_REGISTRY.names())
    assert parse_defense_spec("jpeg:quality=60,subsampling=4:4:4") == {
        "name": "jpeg", "quality": 60, "subsampling": "4:4:4"}
    assert parse_defense_spec("noise:sigma=0.1,per_input=true")["per_input"] is True
    with pytest.raises(DefenseConfigError, match=r"known: .*jpeg, noise, ownership_watermark, poison, trace_watermark"):
        parse_defense_spec("blur")
    with pytest.raises(DefenseConfigError, match="valid parameters: quality, subsampling"):
        parse_defense_spec("jpeg:qualty=3")


@pytest.mark.parametrize(("spec", "message"), [
    ("jpeg:quality=true", "quality: .*got the boolean true"),  # pydantic alone reads true as JPEG quality 1
    ("noise:sigma=true", "sigma: .*got the boolean true"),
    ("jpeg:quality=80,quality=90", "'quality' is given twice"),
])
def test_spec_mistakes_that_used_to_serve_something_else_are_refused(spec: str, message: str) -> None:
    with pytest.raises(DefenseConfigError, match=message):
        parse_defense_spec(spec)


def test_settings_refuse_booleans_for_numbers_and_specs_keep_digits_as_text_for_text_fields() -> None:
    with pytest.raises(SettingsError, match=r"quality: .*boolean true"):
        Settings.from_mapping({"tiers": {"free": {"defenses": [{"name": "jpeg", "quality": True}]}}}, "victim.toml")
    with pytest.raises(SettingsError, match=r"sigma: .*boolean false"):
        Settings.from_mapping({"tiers": {"free": {"defenses": [{"name": "noise", "sigma": False}]}}}, "victim.toml")
    assert parse_defense_spec("ownership_watermark:key_id=42")["key_id"] == "42"
    assert parse_defense_spec("feature_amplify:layer=3")["layer"] == "3"
    assert parse_defense_spec("noise:sigma=0.1,per_input=false")["per_input"] is False


def test_unknown_defense_in_a_level_is_refused_with_its_place_and_the_choices() -> None:
    bad = {"tiers": {"free": {"levels": [[{"name": "noise"}], [{"name": "nosie"}]]}}}
    with pytest.raises(SettingsError) as exc:
        Settings.from_mapping(bad, "victim.toml")
    msg = str(exc.value)
    assert "victim.toml: tiers.free.levels: level 2" in msg
    assert "known: feature_amplify, fmd, jpeg, noise, ownership_watermark, poison, trace_watermark" in msg
    with pytest.raises(SettingsError, match="valid parameters: sigma, kind, per_input"):
        Settings.from_mapping({"models": [{"name": "m", "source": "zoo:sr4x", "levels": [[{"name": "noise",
                                                                                              "sgma": 1}]]}]})


def test_policy_resolves_per_client_and_the_log_records_what_was_applied(
    tmp_path: Path, redis_url: str, key_prefix: str
) -> None:
    models = tiny_models(tmp_path / "models", ("denoise",))
    with start_victim(
        tmp_path, models=[{"name": "denoise", "source": str(models["denoise"]), "max_batch": 4}],
        tiers={"free": {"rate": None, "levels": LEVELS}}, keys={"alice": "free", "bob": "free"},
        redis_url=redis_url, key_prefix=key_prefix,
    ) as srv, srv.client() as c:
        adm = srv.admin_headers
        r = c.get("/v1/admin/clients/bob/level", headers=adm)
        assert r.status_code == 200
        assert r.json()["level"] == 0
        assert r.json()["max_level"] == 2
        r = c.post("/v1/admin/clients/bob/level", json={"level": 2, "reason": "test"}, headers=adm)
        assert r.status_code == 200, r.text
        assert c.get("/v1/admin/clients/bob/level", headers=adm).json()["reason"] == "test"
        assert c.post("/v1/admin/clients/bob/level", json={"level": 3}, headers=adm).json()["error"] == "bad_level"
        assert c.post("/v1/admin/clients/bob/level", json={"level": 1}, headers=srv.headers("alice")).status_code == 401
        img = image_bytes(48, 48, seed=3)
        outs = {}
        for who in ("alice", "bob"):
            r = c.post("/v1/models/denoise/translate", content=img,
                       headers={**srv.headers(who), "Content-Type": "image/png"})
            assert r.status_code == 200, r.text
            outs[who] = decode_image(r.content)
        entries = {e["client"]: e for e in c.get("/v1/admin/log", params={"limit": 10}, headers=adm).json()}
        assert entries["alice"]["defenses"] == []
        assert entries["alice"]["level"] == 0
        assert entries["bob"]["level"] == 2
        assert entries["bob"]["defenses"] == ["noise(sigma=0.05,kind=gaussian,per_input=True)",
                                              "jpeg(quality=50,subsampling=4:2:0)"]
        assert float((outs["alice"] - outs["bob"]).abs().mean()) > 0.01  # bob's output really was defended
        # Back to level 0: bob now gets alice's (undefended) output.
        assert c.post("/v1/admin/clients/bob/level", json={"level": 0}, headers=adm).status_code == 200
        r = c.post("/v1/models/denoise/translate", content=img,
                   headers={**srv.headers("bob"), "Content-Type": "image/png"})
        assert float((decode_image(r.content) - outs["alice"]).abs().max()) == 0.0


def _rotated_jpeg(w: int, h: int) -> bytes:
    """A ``w x h`` JPEG stored sideways: EXIF orientation 6 (display rotated 90 degrees clockwise)."""
    a = np.zeros((h, w, 3), np.uint8)
    a[:, : w // 4] = 255  # a white band on the stored image's left edge
    im = Image.fromarray(a)
    exif = im.getexif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=95, exif=exif.tobytes())
    return buf.getvalue()


def test_exif_rotated_jpeg_is_served_upright(tmp_path: Path) -> None:
    models = tiny_models(tmp_path / "models", ("denoise",))
    data = _rotated_jpeg(64, 32)
    with start_victim(tmp_path, models=[{"name": "denoise", "source": str(models["denoise"]), "max_batch": 1}],
                      tiers={"free": {"rate": None}}, keys={"alice": "free"}) as srv, srv.client() as c:
        r = c.post("/v1/models/denoise/translate", content=data, headers={**srv.headers("alice"),
                                                                             "Content-Type": "image/jpeg"})
        assert r.status_code == 200, r.text
        out = Image.open(io.BytesIO(r.content))
        assert out.size == (32, 64)  # portrait, as a phone shows it
        entry = c.get("/v1/admin/log", params={"limit": 1}, headers=srv.admin_headers).json()[-1]
        assert (entry["width"], entry["height"]) == (32, 64)
    x = decode_image(data)
    assert float(x[0, :, :8].mean()) > 0.9
    assert float(x[0, :, -8:].mean()) < 0.1


def _heist(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "HEIST_TORCH_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "heist.cli.main", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=120)


def test_serve_defense_on_a_models_dir(tmp_path: Path) -> None:
    models = tiny_models(tmp_path / "models", ("denoise",))
    cfg = tmp_path / "victim.json"
    _, keys, admin = write_settings(cfg, tiers={"free": {"rate": None}}, keys={"alice": "free"},
                                    data_dir=tmp_path / "data")
    for spec, want in (("jpeg:qualty=3", "valid parameters: quality, subsampling"),):
        bad = _heist("serve", "--config", str(cfg), "--models-dir", str(models["denoise"].parent),
                     "--defense", spec, cwd=tmp_path)
        assert bad.returncode == 2
        assert want in bad.stderr
        assert "Traceback" not in bad.stderr
        assert len([ln for ln in bad.stderr.splitlines() if ln.strip()]) <= 2
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "HEIST_TORCH_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "heist.cli.main", "serve", "--config", str(cfg), "--port", str(port),
         "--models-dir", str(models["denoise"].parent), "--defense", "trace_watermark",
         "--defense", "jpeg:quality=80", "--log-level", "warning"],
        env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "heist serve did not become ready"
            time.sleep(0.5)
        r = httpx.post(f"{url}/v1/models/denoise/translate", content=image_bytes(64, 64),
                       headers={"X-API-Key": keys["alice"], "Content-Type": "image/png"}, timeout=30)
        assert r.status_code == 200, r.text
        log = httpx.get(f"{url}/v1/admin/log", headers={"X-API-Key": admin}, timeout=10).json()
        assert log[-1]["defenses"] == ["trace_watermark(strength=0.0075,max_rms=0.009)",
                                       "jpeg(quality=80,subsampling=4:2:0)"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
