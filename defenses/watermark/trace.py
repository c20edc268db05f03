"""``trace_watermark``: every output carries a payload naming the API client it was served to.

Payload: the client's keyed 32-bit id (:func:`defenses.watermark.codes.client_id`, HMAC of the client name
under the server secret) coded with Hamming(7,4) into 56 bits, plus 24 keyed pilot bits for
synchronisation, carried by the block-periodic spread-spectrum carrier of
:mod:`defenses.watermark.carrier` (all keyed by ``ctx.secret``, which never leaves the server).

Reading (:func:`identify`): the soft bits are decoded blind (the 32-bit id, after error correction) and
matched against the ids of the clients the server knows; the closest client whose 56 code bits lie
within a distance that an unmarked image reaches with probability below ``max_false_match`` (union bound
over the candidates) is named. Outputs smaller than one 32-pixel tile are served unmarked.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache

import torch
from pydantic import Field

from defenses.base import DefenseContext, DefenseParams, OutputDefense, request_rng, request_seed
from defenses.registry import DEFENSE_REGISTRY
from defenses.watermark import codes
from defenses.watermark.carrier import Carrier, embed, make_carrier, read_carrier

PILOT_BITS = 24
N_BITS = codes.CODE_BITS + PILOT_BITS
TILE = 32
BAND = (2.0, 9.0)  # cycles per tile: 0.06..0.28 cycles/pixel
LUMA_SHARE = 0.6  # share of the carrier's energy on the luma axis (the rest on the two chroma axes)
MIN_SIDE = TILE


def carrier_for(secret: int) -> Carrier:
    """The trace carrier of ``secret`` (cached)."""
    return make_carrier(int(secret), N_BITS, TILE, BAND, LUMA_SHARE)


@lru_cache(maxsize=16)
def pilot_signs(secret: int) -> torch.Tensor:
    """``(N_BITS,)``: 0 on the payload positions, the keyed ±1 pilot on the last ``PILOT_BITS``."""
    g = request_rng(request_seed(int(secret), "heist-trace-pilot"))
    out = torch.zeros(N_BITS)
    out[codes.CODE_BITS :] = torch.randint(0, 2, (PILOT_BITS,), generator=g).float() * 2 - 1
    return out


def client_signs(secret: int, client: str) -> torch.Tensor:
    """``(N_BITS,)`` ±1: the coded id of ``client`` followed by the pilot."""
    s = pilot_signs(secret).clone()
    s[: codes.CODE_BITS] = codes.encode(codes.client_id(secret, client)).float() * 2 - 1
    return s


class TraceParams(DefenseParams):
    """``strength``: per-pixel RMS of the plain spread-spectrum pattern ([0, 1] units; 0.0075 = 42.5 dB).
    ``max_rms``: cap on the RMS actually added after informed embedding (0.009 = PSNR 40.9 dB)."""

    strength: float = Field(0.0075, gt=0.0, le=0.05)
    max_rms: float = Field(0.009, gt=0.0, le=0.05)


@DEFENSE_REGISTRY.register("trace_watermark")
class TraceWatermark(OutputDefense):
    """Embed the receiving client's id: ``(N, 3, H, W) -> (N, 3, H, W)``, one payload per row's ``ctx``."""

    name = "trace_watermark"
    Params = TraceParams
    params: TraceParams

    def apply(self, outputs: torch.Tensor, inputs: torch.Tensor, ctx: DefenseContext) -> torch.Tensor:
        h, w = outputs.shape[-2:]
        if min(h, w) < MIN_SIDE:
            return outputs
        carrier = carrier_for(ctx.secret)
        signs = client_signs(ctx.secret, ctx.client_id)
        rows = [
            embed(carrier, outputs[i : i + 1].detach().float().cpu(), signs, self.params.strength,
                  max_rms=self.params.max_rms)
            for i in range(outputs.shape[0])
        ]
        return torch.cat(rows).to(device=outputs.device, dtype=outputs.dtype)


@dataclass(frozen=True)
class TraceReading:
    """What an image carries: the blind-decoded 32-bit ``payload_id`` (after error correction), the 56 hard
    code bits, their soft values ``z`` and the pilot's ``sync_z`` (how clearly a watermark was found)."""

    payload_id: int
    code_bits: torch.Tensor
    z: torch.Tensor
    sync_z: float
    shift: tuple[int, int]


@dataclass(frozen=True)
class TraceMatch:
    """The verdict for one image. ``client`` is None when no known client is close enough.

    ``distance``: Hamming distance between the image's 56 code bits and the nearest candidate's;
    ``p_false_match``: probability that an unmarked image comes as close to any of the ``candidates``
    (binomial tail x candidates, see :mod:`defenses.watermark.codes`).
    """

    client: str | None
    nearest: str | None
    distance: int
    p_false_match: float
    candidates: int
    reading: TraceReading


def read_trace(image: torch.Tensor, secret: int) -> TraceReading:
    """Read the payload of ``image (1, 3, H, W)`` in [0, 1]. ``ValueError`` when a side is under 32 pixels."""
    if min(image.shape[-2:]) < MIN_SIDE:
        raise ValueError(f"image is {image.shape[-1]}x{image.shape[-2]}; tracing needs at least {MIN_SIDE}x{MIN_SIDE}")
    r = read_carrier(carrier_for(secret), image, pilot_signs(secret))
    soft = r.z[: codes.CODE_BITS]
    payload, _ = codes.decode_soft(soft)
    return TraceReading(payload, (soft > 0).long(), soft, r.sync_z, r.shift)


def identify(
    image: torch.Tensor, secret: int, clients: Iterable[str], max_false_match: float = 1e-6
) -> TraceMatch:
    """Name the client among ``clients`` whose payload ``image`` carries, or None (see :class:`TraceMatch`)."""
    reading = read_trace(image, secret)
    names = sorted(set(clients))
    best, best_d = None, codes.CODE_BITS + 1
    for name in names:
        d = int((codes.encode(codes.client_id(secret, name)) != reading.code_bits).sum())
        if d < best_d:
            best, best_d = name, d
    if best is None:
        return TraceMatch(None, None, codes.CODE_BITS, 1.0, 0, reading)
    p = min(1.0, len(names) * codes.binomial_tail(codes.CODE_BITS, best_d))
    return TraceMatch(best if p <= max_false_match else None, best, best_d, p, len(names), reading)
