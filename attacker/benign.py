"""Benign traffic: customers of the victim API, to calibrate and test the query monitor against.

A customer (:func:`plan_benign`) owns a few photos (disjoint between customers when the pool allows;
real customers rarely share photos) and sends each one whole, resized to a random size the model accepts,
as PNG or JPEG. Now and then a request is retried byte for byte (``retry_p``) or a photo is uploaded again
later at another size (``reupload_p``). Requests come in bursts (``burst``) separated by think time
(``think_s``); many customers run at once (:func:`run_benign`), each over its own key, through the
attacker's HTTP client (:class:`attacker.client.VictimClient`).

Deterministic in ``seed``: the same plan, image bytes and delays every time.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field

from attacker.client import ClientConfig, Outcome, VictimClient
from attacker.errors import ConfigError
from attacker.victim_info import ModelInfo
from translators.codecs import encode_image
from translators.corpus import NamedImage
from translators.images import bicubic_resize

log = logging.getLogger(__name__)


class BenignParams(BaseModel):
    """Shape of the benign population.

    Attributes:
        clients: customers at once; photos_per_client: distinct photos each one sends.
        min_side / max_side: short side of a sent photo, input pixels (clipped to the model's limits).
        retry_p: probability a request is resent byte for byte; reupload_p: that a photo is sent again
            later at another size and format.
        burst: (lo, hi) requests per burst; gap_s: pause inside a burst; think_s: (lo, hi) between bursts.
        jpeg_p: share of photos sent as JPEG (quality 85-95).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    clients: int = Field(8, ge=1, le=10_000)
    photos_per_client: int = Field(4, ge=1)
    min_side: int = Field(24, ge=1)
    max_side: int = Field(160, ge=1)
    retry_p: float = Field(0.05, ge=0.0, le=1.0)
    reupload_p: float = Field(0.1, ge=0.0, le=1.0)
    burst: tuple[int, int] = (1, 4)
    gap_s: float = Field(0.05, ge=0.0)
    think_s: tuple[float, float] = (2.0, 30.0)
    jpeg_p: float = Field(0.3, ge=0.0, le=1.0)


@dataclass
class BenignRequest:
    """One planned request: ``delay_s`` to wait before sending it; ``kind``: new, retry or reupload."""

    delay_s: float
    body: bytes
    media_type: str
    photo: str
    kind: str


@dataclass
class BenignClient:
    name: str
    requests: list[BenignRequest] = field(default_factory=list)


def _fit(x, info: ModelInfo, side: int):  # type: ignore[no-untyped-def]
    """Resize ``(1, 3, H, W)`` so its short side is about ``side``, within the model's published limits."""
    h, w = x.shape[-2:]
    f = side / min(h, w)
    if info.max_pixels is not None:
        f = min(f, math.sqrt(info.max_pixels / (h * w)))
    m = max(1, info.size_multiple)
    nh, nw = max(m, int(h * f) // m * m), max(m, int(w * f) // m * m)
    lo = max(info.min_side, m)
    nh, nw = max(nh, math.ceil(lo / m) * m), max(nw, math.ceil(lo / m) * m)
    return bicubic_resize(x, (nh, nw)) if (nh, nw) != (h, w) else x


def _encode(x, rng: random.Random, jpeg_p: float) -> tuple[bytes, str]:  # type: ignore[no-untyped-def]
    if rng.random() < jpeg_p:
        return encode_image(x, "jpeg", quality=rng.randint(85, 95)), "image/jpeg"
    return encode_image(x, "png"), "image/png"


def plan_benign(images: Sequence[NamedImage], info: ModelInfo, params: BenignParams | None = None,
                seed: int = 0, prefix: str = "benign") -> list[BenignClient]:
    """Every customer's requests, in order. Photos are dealt out without overlap while the pool lasts."""
    p = params or BenignParams()
    if not images:
        raise ConfigError("benign traffic needs at least one photo")
    rng = random.Random(f"heist:benign:{seed}")
    order = list(range(len(images)))
    rng.shuffle(order)
    if len(images) < p.clients * p.photos_per_client:
        log.warning("%d photos for %d customers x %d photos: customers will share photos", len(images), p.clients,
                    p.photos_per_client)
    out: list[BenignClient] = []
    deal = 0
    for c in range(p.clients):
        crng = random.Random(f"heist:benign:{seed}:{c}")
        client = BenignClient(f"{prefix}-{c:03d}")
        photos = []
        for _ in range(p.photos_per_client):
            photos.append(images[order[deal % len(order)]])
            deal += 1
        queue: list[tuple[NamedImage, str]] = [(im, "new") for im in photos]
        in_burst = 0
        burst_len = crng.randint(*p.burst)
        while queue:
            im, kind = queue.pop(0)
            side = crng.randint(min(p.min_side, p.max_side), p.max_side)
            x = _fit(im.image, info, side)
            body, mt = _encode(x, crng, p.jpeg_p)
            if in_burst >= burst_len:
                delay, in_burst, burst_len = crng.uniform(*p.think_s), 0, crng.randint(*p.burst)
            else:
                delay = p.gap_s if client.requests else 0.0
            in_burst += 1
            client.requests.append(BenignRequest(delay, body, mt, im.name, kind))
            if crng.random() < p.retry_p:
                client.requests.append(BenignRequest(p.gap_s, body, mt, im.name, "retry"))
            if kind == "new" and crng.random() < p.reupload_p:
                queue.insert(crng.randint(0, len(queue)), (im, "reupload"))
        out.append(client)
    return out


async def _run_one(vc: VictimClient, model: str, key: str, client: BenignClient,
                   time_scale: float) -> list[Outcome]:
    outs = []
    for r in client.requests:
        if r.delay_s > 0 and time_scale > 0:
            await asyncio.sleep(r.delay_s * time_scale)
        # a customer's app waits out a 429 (at most 5 s a time, 20 times) and retries 5xx / transport errors
        # (the client's max_retries); a refusal or the last failure is recorded, not raised
        outs.append(await vc.translate_retrying(model, key, r.body, r.media_type, what=f"{client.name}'s request",
                                                check=False, max_rate_waits=20, max_wait_s=5.0))
    return outs


async def run_benign(url: str, model: str, keys: dict[str, str], plan: Sequence[BenignClient],
                     time_scale: float = 1.0, config: ClientConfig | None = None) -> dict[str, list[Outcome]]:
    """Send every customer's plan concurrently (``keys``: customer name -> API key). ``time_scale``
    multiplies all delays (0 = as fast as possible). Returns each customer's outcomes (one per planned
    request: the answer that ended it after :meth:`~attacker.client.VictimClient.translate_retrying`'s
    retries; ``Outcome.attempts`` counts the requests sent for it)."""
    missing = [c.name for c in plan if c.name not in keys]
    if missing:
        raise ConfigError(f"no API key for benign client(s) {', '.join(missing[:5])}")
    async with VictimClient(url, config, connections=min(64, len(plan) + 2)) as vc:
        results = await asyncio.gather(*(_run_one(vc, model, keys[c.name], c, time_scale) for c in plan))
    return {c.name: r for c, r in zip(plan, results, strict=True)}
