"""The campaign's victim: a self-started ``heist serve`` (or a given URL) and HTTP translators over it.

Self-started mode writes one settings file with, per defense label ``L``:

- tier ``atk-L``: the campaign's ``[limits]`` plus defense pipeline ``L``; one static key per attack cell
  (each attack is its own client with its own quota, as a real thief with a fresh account would be);
- tier ``honest-L``: no limits, the same pipeline; the evaluator's key for honest-user measurements.

Evaluation traffic goes through the same HTTP API as the attack, so the defended outputs the report
scores are exactly what clients received.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from attacker.victim_info import ModelInfo
from evaluation.campaign.config import CampaignConfig
from translators.codecs import decode_image, encode_image
from translators.device import default_threads
from translators.errors import HeistError
from translators.files import atomic_write_json

log = logging.getLogger(__name__)
Translator = Callable[[torch.Tensor], torch.Tensor]


class VictimError(HeistError):
    """The victim service refused or failed an evaluation request."""

    code = "victim_error"


def attack_tier(label: str) -> str:
    return f"atk-{label}"


def honest_tier(label: str) -> str:
    return f"honest-{label}"


@dataclass
class VictimKeys:
    """Plaintext keys of the self-started service, persisted so a resumed campaign reuses them."""

    admin: str
    honest: dict[str, str] = field(default_factory=dict)  # defense label -> key
    attack: dict[str, str] = field(default_factory=dict)  # cell id -> key

    @classmethod
    def load_or_create(cls, path: Path) -> VictimKeys:
        if path.exists():
            raw = json.loads(path.read_text())
            return cls(raw["admin"], raw.get("honest", {}), raw.get("attack", {}))
        return cls(admin=f"hk_admin_{secrets.token_hex(16)}")

    def save(self, path: Path) -> None:
        atomic_write_json(path, {"admin": self.admin, "honest": self.honest, "attack": self.attack}, durable=False,
                          mode=0o600)

    def ensure(self, table: dict[str, str], name: str) -> str:
        if name not in table:
            table[name] = f"hk_{secrets.token_hex(16)}"
        return table[name]


def victim_settings(
    cfg: CampaignConfig, models: dict[str, str], keys: VictimKeys, cell_ids: dict[str, str], data_dir: Path
) -> dict[str, Any]:
    """Settings mapping for ``heist serve``: ``models`` victim name -> source; ``cell_ids`` cell -> defense label."""
    lim = cfg.limits
    tiers: dict[str, dict[str, Any]] = {}
    static: list[dict[str, str]] = []
    for d in cfg.defenses:
        tiers[attack_tier(d.label)] = {"rate": lim.rate, "burst": lim.burst, "quota_total": lim.quota_total,
                                       "quota_daily": lim.quota_daily, "defenses": d.pipeline,
                                       "levels": d.levels}
        tiers[honest_tier(d.label)] = {"rate": None, "burst": 1, "defenses": d.pipeline}
        static.append({"name": f"honest-{d.label}", "tier": honest_tier(d.label),
                       "key": keys.ensure(keys.honest, d.label)})
    for cell_id, label in cell_ids.items():
        static.append({"name": f"atk-{cell_id}"[:64], "tier": attack_tier(label),
                       "key": keys.ensure(keys.attack, cell_id)})
    svc = cfg.victim_service
    # Absolute paths: a settings file's relative paths are relative to the file, not to the campaign's
    # working directory (a relative --out doubled them and the served model was "no such file").
    settings: dict[str, Any] = {
        "models": [{"name": n, "source": s if s.startswith("zoo:") else str(Path(s).resolve()),
                    "max_batch": svc.max_batch} for n, s in models.items()],
        "tiers": tiers,
        "keys": static,
        "admin_key": keys.admin,
        "data_dir": str(data_dir.resolve()),
        "redis_url": svc.redis_url,
        "torch_threads": default_threads(),  # the attacker trains beside the server: don't oversubscribe
    }
    if svc.redis_url:
        settings["key_prefix"] = f"heist-campaign:{cfg.campaign.name}:{secrets.token_hex(4)}:"
    return settings


class HttpTranslator:
    """``(1, 3, h, w)`` -> the victim's ``(1, 3, s*h, s*w)`` output, through ``POST /v1/models/M/translate``.

    Built on the attacker's HTTP client (:class:`attacker.client.VictimClient`), driven from a private
    event loop so evaluation code can call it synchronously. Each call follows
    :meth:`~attacker.client.VictimClient.translate_retrying`: a 429 ``rate_limited`` is waited out
    (``Retry-After``, at most 10 s a time), 5xx and transport errors are retried up to ``retries`` times with
    full-jitter backoff; a used-up quota, a refusal or the retries spent raise :class:`VictimError`.
    ``requests`` counts every request sent, retries included. A context manager:
    ``with HttpTranslator(url, model, key) as victim: y = victim(x)``.
    """

    def __init__(self, url: str, model: str, key: str, timeout: float = 120.0, retries: int = 5) -> None:
        from attacker.client import ClientConfig, VictimClient

        self.model, self.key, self.retries = model, key, retries
        self.endpoint = f"{url.rstrip('/')}/v1/models/{model}/translate"
        self._loop = asyncio.new_event_loop()
        self._client = VictimClient(url, ClientConfig(max_concurrency=1, read_timeout_s=timeout, max_retries=retries))
        self._loop.run_until_complete(self._client.__aenter__())
        self.requests = 0

    def __enter__(self) -> HttpTranslator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        from attacker.client import Outcome
        from attacker.errors import AttackError

        body = encode_image(x[:1].float().clamp(0, 1))

        async def counted(fn: Callable[[], Awaitable[Outcome]]) -> Outcome:
            self.requests += 1
            return await fn()

        try:
            out = self._loop.run_until_complete(self._client.translate_retrying(
                self.model, self.key, body, what="the evaluation query", max_wait_s=10.0, send=counted))
        except AttackError as exc:
            raise VictimError(f"{self.endpoint}: {exc}") from None
        return decode_image(out.body)

    def close(self) -> None:
        """Close the connection pool and the loop; safe to call twice."""
        if self._loop.is_closed():
            return
        try:
            self._loop.run_until_complete(self._client.__aexit__(None, None, None))
        finally:
            self._loop.close()


def model_info(url: str, name: str) -> ModelInfo:
    """The public ``GET /v1/models`` entry of ``name`` (through the attacker's client)."""
    from attacker.client import VictimClient

    async def fetch() -> ModelInfo:
        async with VictimClient(url) as client:
            return await client.model_info(name)

    return asyncio.run(fetch())
