"""docker-compose.yml (+ GPU override) validated by a real compose parser; Dockerfile sources exist.

No Docker engine is needed: `docker-compose config` (Debian's docker-compose 1.29) or `docker compose
config` (the v2 plugin) parse, interpolate and validate the files against the Compose schema.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
INSTALL_HINT = ("no Compose parser found: install one with `apt-get install -y docker-compose` (Debian/Ubuntu; "
                "validates without a Docker engine) or the Docker Compose v2 plugin (`docker compose`)")


def _compose_cmd() -> list[str]:
    exe = shutil.which("docker-compose")
    if exe:
        return [exe]
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True, timeout=60).returncode == 0:
        return [docker, "compose"]
    pytest.fail(INSTALL_HINT)


def _config(*files: str, env: dict[str, str] | None = None) -> dict:
    args = [*_compose_cmd()]
    for f in files:
        args += ["-f", str(ROOT / f)]
    r = subprocess.run([*args, "config"], capture_output=True, text=True, cwd=ROOT, timeout=120,
                       env={**os.environ, **(env or {})})
    assert r.returncode == 0, f"compose config failed:\n{r.stderr}"
    return yaml.safe_load(r.stdout)


def test_compose_file_validates_and_wires_the_services() -> None:
    cfg = _config("docker-compose.yml")
    services = cfg["services"]
    assert set(services) == {"redis", "victim", "lb", "campaign"}
    redis = services["redis"]
    cmd = redis["command"]
    assert cmd[cmd.index("--appendonly") + 1] == "yes"  # AOF on
    assert any(v.split(":")[0] == "redis-data" or (isinstance(v, dict) and v.get("source") == "redis-data")
               for v in redis["volumes"])
    assert "redis-data" in cfg["volumes"]
    victim = services["victim"]
    assert victim["command"] == ["serve"]  # settings found like every heist command: HEIST_VICTIM_CONFIG
    assert victim["environment"]["HEIST_VICTIM_CONFIG"] == "configs/victim-compose.toml"
    assert services["campaign"]["environment"]["HEIST_VICTIM_CONFIG"] == "configs/victim-compose.toml"
    assert (ROOT / victim["environment"]["HEIST_VICTIM_CONFIG"]).exists()
    assert "/readyz" in " ".join(victim["healthcheck"]["test"])
    assert victim["depends_on"]["redis"]["condition"] == "service_healthy"
    assert victim["environment"]["HEIST_VICTIM_REDIS_URL"] == "redis://redis:6379/0"
    assert victim["environment"]["HEIST_VICTIM_HOST"] == "0.0.0.0"
    assert "deploy" not in victim  # the base file must start on hosts without GPUs
    campaign = services["campaign"]
    assert campaign["command"] == ["campaign", "run", "configs/campaigns/compose.toml", "--victim-url",
                                   "http://lb:8000"]
    assert campaign["depends_on"]["lb"]["condition"] == "service_healthy"
    mounts = [str(v) if isinstance(v, str) else f"{v.get('source')}:{v.get('target')}" for v in campaign["volumes"]]
    assert any(m.startswith(str(ROOT / "reports")) and ":/app/runs" in m for m in mounts)


def test_gpu_override_reserves_gpus_for_the_victim_only() -> None:
    cfg = _config("docker-compose.yml", "docker-compose.gpu.yml")
    devices = cfg["services"]["victim"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    assert devices[0]["driver"] == "nvidia"
    assert "cu12" in cfg["services"]["victim"]["build"]["args"]["TORCH_INDEX_URL"]
    assert "deploy" not in cfg["services"]["campaign"]


def test_port_override_is_interpolated() -> None:
    cfg = _config("docker-compose.yml", env={"HEIST_VICTIM_PORT": "18080"})
    ports = cfg["services"]["lb"]["ports"]
    published = {str(p["published"]) if isinstance(p, dict) else p.split(":")[0] for p in ports}
    assert "18080" in published


def test_dockerfile_copies_only_what_exists() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r'^ENTRYPOINT \["heist"\]$', text, re.M)
    for line in text.splitlines():
        if line.startswith("COPY "):
            for src in line.split()[1:-1]:
                if "[" in src:  # an optional file (README.m[d])
                    continue
                assert (ROOT / src).exists(), f"Dockerfile copies {src}, which is not in the repository"
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored
    assert ".git" in ignored


def test_compose_victim_and_campaign_configs_agree() -> None:
    """The compose campaign's API keys exist in the compose victim, in tiers applying the same defenses."""
    from evaluation.campaign.config import load_campaign
    from victim_service.settings import Settings

    victim = Settings.from_file("configs/victim-compose.toml")
    campaign, _ = load_campaign("configs/campaigns/compose.toml")
    tier_of = {k.key.get_secret_value(): k.tier for k in victim.keys}
    served = {m.name for m in victim.models}
    assert {v.name for v in campaign.victims} <= served
    for d in campaign.defenses:
        assert d.api_key in tier_of, d.label
        assert victim.tiers[tier_of[d.api_key]].defenses == d.pipeline


def test_victim_scales_behind_the_nginx_load_balancer() -> None:
    """``docker compose up --scale victim=3``: no fixed host port or container name on the victim (replicas
    would collide), an official nginx image publishes the port and proxies to every replica via Docker DNS."""
    cfg = _config("docker-compose.yml")
    victim, lb = cfg["services"]["victim"], cfg["services"]["lb"]
    assert "ports" not in victim
    assert "container_name" not in victim
    assert lb["image"].startswith("nginx:")
    assert lb["depends_on"]["victim"]["condition"] == "service_healthy"
    assert {str(p["target"]) if isinstance(p, dict) else p.split(":")[-1] for p in lb["ports"]} == {"8000"}
    mounts = [str(v) if isinstance(v, str) else f"{v.get('source')}:{v.get('target')}" for v in lb["volumes"]]
    conf_mount = next(m for m in mounts if "/etc/nginx/conf.d/default.conf" in m)
    conf = ROOT / "configs" / "nginx-victim.conf"
    assert conf_mount.startswith(str(conf))
    text = conf.read_text()
    assert re.search(r"^\s*resolver 127\.0\.0\.11\b", text, re.M)  # Docker's DNS: one address per replica
    assert re.search(r"^\s*set \$victim_upstream http://victim:8000;", text, re.M)
    assert re.search(r"^\s*proxy_pass \$victim_upstream;", text, re.M)
    # nginx must not give up before the victim answers its own 503: its read timeout exceeds the victim's
    from victim_service.settings import Settings

    victim_settings = Settings.from_file("configs/victim-compose.toml")
    read_timeout = int(re.search(r"proxy_read_timeout (\d+)s;", text).group(1))
    assert read_timeout > victim_settings.request_timeout_s
    max_body_mb = int(re.search(r"client_max_body_size (\d+)m;", text).group(1))
    assert max_body_mb * 2**20 > victim_settings.images.max_bytes
