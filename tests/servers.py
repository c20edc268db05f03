"""Start a real victim server for a test: settings file + uvicorn subprocess on a free port.

Attacker and evaluation tests import this. Typical use::

    from tests.servers import start_victim, tiny_models

    def test_something(tmp_path, redis_url, key_prefix):
        models = tiny_models(tmp_path / "models")                      # {"sr4x": path, "denoise": path, ...}
        srv = start_victim(
            tmp_path,
            models=[{"name": "sr4x", "source": str(models["sr4x"])}],
            tiers={"free": {"rate": 2.0, "burst": 5, "quota_total": 100}},
            keys={"alice": "free"},                                     # client name -> tier
            redis_url=redis_url, key_prefix=key_prefix,                 # omit both for the embedded mode
        )
        try:
            r = httpx.post(f"{srv.url}/v1/models/sr4x/translate", content=png_bytes,
                           headers={**srv.headers("alice"), "Content-Type": "image/png"})
        finally:
            srv.stop()

or as a context manager: ``with start_victim(...) as srv: ...``. ``srv.keys`` maps client name to plaintext key,
``srv.admin_key`` is the admin key, ``srv.kill()`` SIGKILLs the server (crash tests), ``srv.settings`` the
validated :class:`~victim_service.settings.Settings`.

Every server gets its own data dir under ``tmp_path`` (key file, JSONL query log), one torch thread per
worker and a short batch-size probe so start-up stays quick.
"""

from __future__ import annotations

import io
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
import numpy as np
import torch
from PIL import Image

from translators.archs.registry import build_arch
from translators.checkpoint import ModelCard, save_checkpoint
from victim_service.process import ServiceProcess, start_service
from victim_service.querylog import LogReader, QueryLogEntry
from victim_service.settings import Settings

DEFAULT_TIERS: dict[str, dict[str, Any]] = {
    "free": {"rate": 1.0, "burst": 5},
    "unlimited": {"rate": None},
}

TINY_ARCHS: dict[str, tuple[str, dict[str, Any], str, int, int]] = {
    # name: (arch, kwargs, task, scale, size_multiple)
    "sr4x": ("srresnet", {"scale": 4, "channels": 8, "n_blocks": 1}, "sr", 4, 1),
    "denoise": ("dncnn", {"channels": 8, "depth": 3}, "denoise", 1, 1),
    "unet8": ("unet", {"base": 8, "depth": 3, "max_channels": 16}, "style", 1, 8),
}


def tiny_models(folder: Path, names: tuple[str, ...] = ("sr4x", "denoise", "unet8"), seed: int = 0) -> dict[str, Path]:
    """Untrained tiny checkpoints (safetensors + card) in ``folder``; reused when already there."""
    folder.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}
    for name in names:
        arch, kwargs, task, scale, mult = TINY_ARCHS[name]
        path = folder / f"{name}.safetensors"
        if not path.exists():
            torch.manual_seed(seed)
            module = build_arch(arch, kwargs).eval()
            card = ModelCard(name=name, arch=arch, kwargs=kwargs, task=task, scale=scale, size_multiple=mult,
                             min_side=8, description="untrained tiny test model")
            save_checkpoint(module, path, card)
        out[name] = path
    return out


def tiny_torchscript(folder: Path, name: str = "scripted", seed: int = 0) -> Path:
    """A TorchScript ``.pt`` (tiny DnCNN, no card: the server infers scale 1 by a probe forward)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.pt"
    if not path.exists():
        torch.manual_seed(seed)
        module = build_arch("dncnn", {"channels": 8, "depth": 3}).eval()
        torch.jit.script(module).save(str(path))
    return path


def image_bytes(h: int = 32, w: int = 32, fmt: str = "png", seed: int = 0, mode: str = "RGB") -> bytes:
    """A smooth random ``w x h`` test image encoded as ``fmt`` (png, jpeg, webp, gif, bmp) in Pillow ``mode``.

    Modes: ``RGB``, ``L`` (grayscale), ``RGBA``, ``LA``, ``P``, ``I;16`` (16-bit grayscale PNG).
    """
    rng = np.random.default_rng(seed)
    low = rng.random((max(h // 4, 1), max(w // 4, 1), 3))
    img = Image.fromarray((low * 255).astype(np.uint8), "RGB").resize((w, h), Image.BICUBIC)
    if mode == "I;16":
        arr = (np.asarray(img.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
        img = Image.fromarray(arr)  # uint16 -> mode I;16
    elif mode in ("RGBA", "LA"):
        img = img.convert(mode)
        alpha = Image.fromarray((rng.random((h, w)) * 255).astype(np.uint8), "L")
        img.putalpha(alpha)
    elif mode != "RGB":
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, {"jpg": "JPEG"}.get(fmt, fmt.upper()))
    return buf.getvalue()


@dataclass
class VictimServer:
    """A running victim service started by :func:`start_victim`."""

    process: ServiceProcess
    keys: dict[str, str]
    admin_key: str
    settings_path: Path
    settings: Settings
    data_dir: Path
    key_prefix: str | None
    redis_url: str | None
    tiers: dict[str, str] = field(default_factory=dict)  # client name -> tier

    @property
    def url(self) -> str:
        return self.process.url

    def headers(self, client: str) -> dict[str, str]:
        """``{"X-API-Key": key}`` of ``client``."""
        return {"X-API-Key": self.keys[client]}

    @property
    def admin_headers(self) -> dict[str, str]:
        return {"X-API-Key": self.admin_key}

    def client(self, timeout: float = 30.0) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=timeout)

    def log_entry(self, request_id: str, timeout: float = 5.0) -> QueryLogEntry:
        """The query-log entry of ``request_id`` (the writer is asynchronous: waits up to ``timeout`` s)."""
        reader = LogReader(self.settings)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for e in reader.iter_entries():
                if e.request_id == request_id:
                    return e
            time.sleep(0.05)
        raise AssertionError(f"no query-log entry for request {request_id}")

    def stop(self) -> None:
        self.process.stop()
        self.forget_redis_keys()

    def kill(self) -> None:
        self.process.kill()
        self.forget_redis_keys()

    def forget_redis_keys(self) -> int:
        """Delete this server's keys (``key_prefix*``) from the shared Redis; returns how many."""
        if not self.redis_url or not self.key_prefix or not self.key_prefix.startswith("heist-test:"):
            return 0
        import redis

        try:
            r = redis.Redis.from_url(self.redis_url, socket_connect_timeout=1, socket_timeout=2)
            keys = list(r.scan_iter(match=f"{self.key_prefix}*", count=1000))
            return int(r.delete(*keys)) if keys else 0
        except redis.RedisError:
            return 0

    def __enter__(self) -> VictimServer:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


def write_settings(
    path: Path,
    *,
    models: list[dict[str, Any]] | None = None,
    models_dir: Path | None = None,
    tiers: dict[str, dict[str, Any]] | None = None,
    keys: dict[str, str] | None = None,
    redis_url: str | None = None,
    key_prefix: str | None = None,
    data_dir: Path | None = None,
    extra: dict[str, Any] | None = None,
) -> tuple[Settings, dict[str, str], str]:
    """Write a JSON settings file; returns (validated settings, client -> plaintext key, admin key)."""
    plain = {name: f"hk_test_{name}_{secrets.token_hex(8)}" for name in (keys or {})}
    admin = f"hk_admin_{secrets.token_hex(12)}"
    data: dict[str, Any] = {
        "models": models or [],
        "tiers": tiers if tiers is not None else DEFAULT_TIERS,
        "keys": [{"name": n, "tier": t, "key": plain[n]} for n, t in (keys or {}).items()],
        "admin_key": admin,
        "redis_url": redis_url,
        "key_prefix": key_prefix or f"heist-test:{secrets.token_hex(6)}:",
        "data_dir": str(data_dir or path.parent / "victim-data"),
        "torch_threads": 1,
        "batch_probe_s": 0.03,
    }
    if models_dir is not None:
        data["models_dir"] = str(models_dir)
    data.update(extra or {})
    settings = Settings.from_mapping(data, str(path))
    settings.to_json_file(path)
    return settings, plain, admin


def start_victim(
    tmp_path: Path,
    *,
    models: list[dict[str, Any]] | None = None,
    models_dir: Path | None = None,
    tiers: dict[str, dict[str, Any]] | None = None,
    keys: dict[str, str] | None = None,
    redis_url: str | None = None,
    key_prefix: str | None = None,
    workers: int = 1,
    extra: dict[str, Any] | None = None,
    env: dict[str, str] | None = None,
    name: str = "victim",
    ready_timeout: float = 120.0,
) -> VictimServer:
    """Write settings under ``tmp_path/name`` and start uvicorn on a free port; see the module docstring.

    ``models`` are ``ModelSpec`` dicts (``{"name", "source", "max_batch", "defenses", ...}``); when neither
    ``models`` nor ``models_dir`` is given, the tiny ``sr4x`` and ``denoise`` models are served.
    ``keys`` maps client names to tiers (default: ``alice`` on ``free`` and ``bob`` on ``unlimited``).
    ``extra`` adds or overrides top-level settings (``on_redis_error``, ``query_log``, ...).
    """
    root = tmp_path / name
    root.mkdir(parents=True, exist_ok=True)
    if models is None and models_dir is None:
        tm = tiny_models(tmp_path / "tiny-models", ("sr4x", "denoise"))
        models = [{"name": n, "source": str(p), "max_batch": 4} for n, p in tm.items()]
    if keys is None:
        keys = {"alice": "free", "bob": "unlimited"} if tiers is None else {f"client-{t}": t for t in tiers}
    cfg = root / "settings.json"
    settings, plain, admin = write_settings(
        cfg, models=models, models_dir=models_dir, tiers=tiers, keys=keys, redis_url=redis_url,
        key_prefix=key_prefix, data_dir=root / "data", extra=extra,
    )
    proc = start_service(cfg, workers=workers, env=env, log_path=root / "server.log", ready_timeout=ready_timeout)
    return VictimServer(proc, plain, admin, cfg, settings, root / "data", settings.key_prefix, redis_url, dict(keys))
