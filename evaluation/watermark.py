"""Ownership verification: was a suspect model trained on outputs carrying our ownership watermark?

:func:`verify_ownership` sends probe images to a suspect (a local model or a Heist-compatible HTTP API,
queried with the attacker's client), computes the clean victim's outputs locally, and runs the exact
test of :mod:`defenses.watermark.ownership`: the cosine ``t = <k, u> / (|k| |u|)`` with ``u`` the
least-squares filter that maps the clean outputs' keyed features onto the suspect's residual. Under H0
("the suspect, the probes and the clean victim are independent of our key") the key's direction is
uniform, so ``t^2 ~ Beta(1/2, (d - 1)/2)`` exactly and ``p = P(T >= t)``. The result is a JSON-able
dict (what ``heist defend verify --json`` prints and what a campaign cell stores).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from defenses.jpeg import jpeg_phase_average, jpeg_roundtrip
from defenses.watermark.ownership import OwnershipParams, OwnershipTest, feature_source, ownership_key
from translators.codecs import decode_image, encode_image
from translators.corpus import NamedImage, load_images
from translators.errors import HeistError, ImageError
from translators.images import center_crop

log = logging.getLogger(__name__)

#: ``(input (1, 3, H, W)) -> output (1, 3, sH, sW)`` in [0, 1].
Translator = Callable[[torch.Tensor], torch.Tensor]

NULL_DESCRIPTION = (
    "t = <k, u>/(|k||u|), u = least-squares filter from the clean outputs' keyed features to the suspect's "
    "residual (suspect - clean victim), in the test coordinates of the key's d-dimensional subspace (a fixed "
    "linear map; whitened for colour=luma), with the filters of key-independent "
    "nuisances (JPEG of the clean outputs) projected off k and u. H0: the suspect never saw outputs marked with "
    "key k (k independent of suspect, probes and clean victim) => the direction of the projected k is uniform, "
    "t^2 ~ Beta(1/2, (d-1)/2) exactly; p = P(T >= t), one-sided (colour=split: each part's p so, "
    "reported p = min(1, 2 min over parts), Bonferroni)."
)


#: JPEG qualities whose systematic error on the clean outputs is projected off the test
#: (:class:`~defenses.watermark.ownership.OwnershipTest`'s nuisances): a thief who re-encodes the harvest as
#: JPEG learns that error on top of the mark. Three qualities span the codec's error at the qualities in use.
NUISANCE_JPEG: tuple[int, ...] = (50, 75, 90)


#: JPEG quality of the test's optional second view (:attr:`~defenses.watermark.ownership.OwnershipTest.kept`):
#: the key directions JPEG at this quality keeps (averaged over block-grid phases). Off (``None``) by default:
#: JPEG 75 keeps half or more of only 4 of the default key's 37 directions, and the view found no more
#: evidence against JPEG thieves than the whole-key test (docs/defenses.md, "Surviving JPEG").
KEPT_JPEG: int | None = None


class VerifyError(HeistError):
    """The suspect cannot be queried or answered something that is not an image."""


@dataclass(frozen=True)
class Probe:
    """One probe: ``image (1, 3, H, W)`` in [0, 1], 8-bit exact."""

    name: str
    image: torch.Tensor


def make_probes(images: Sequence[NamedImage], n: int, side: int, multiple: int = 1) -> list[Probe]:
    """``n`` probes of ``side`` x ``side`` pixels (rounded down to ``multiple``): non-overlapping tiles of
    the images, taken round-robin (image 0 tile 0, image 1 tile 0, ...). Smaller images give one centre
    crop of their largest multiple-of-``multiple`` square."""
    tiles: list[list[Probe]] = []
    side = max(multiple, side - side % multiple)
    for im in images:
        x = im.image
        h, w = x.shape[-2:]
        s = min(side, h - h % multiple, w - w % multiple)
        if s < max(16, multiple):
            continue
        own = [Probe(f"{im.name}@{t}:{left}", x[..., t : t + s, left : left + s].contiguous())
               for t in range(0, h - s + 1, s) for left in range(0, w - s + 1, s)]
        tiles.append(own or [Probe(im.name, center_crop(x, s))])
    out: list[Probe] = []
    depth = 0
    while len(out) < n and any(depth < len(t) for t in tiles):
        out.extend(t[depth] for t in tiles if depth < len(t))
        depth += 1
    if not out:
        raise VerifyError(f"no probe image is at least {max(16, multiple)} pixels a side")
    return out[:n]


#: Probe noise (Gaussian sigma, [0, 1] units) for a denoising model when none is given: 25/255, the
#: classic benchmark level (Zhang et al. 2017, DnCNN).
DENOISE_PROBE_SIGMA = 25.0 / 255.0


def probe_noise_for(task: str | None) -> float:
    """Default probe noise for our model's ``task``: probes should look like the API's traffic.

    A denoiser's traffic is noisy photos, and the ownership mark is a filter of the request's input, so
    clean probes give it little to carry: on the tiny ``denoise25`` victim a ``resunet`` thief (64 pairs)
    scored p = 0.011 with 32 clean 128 px probes and p = 5.8e-7 with the same probes at sigma 25/255, both
    with the first (``z``) test (``bench/results/watermark_campaign-clean-probes.json``,
    ``watermark_campaign-z-test.json``). Other tasks: 0 (clean photos are their traffic).
    """
    return DENOISE_PROBE_SIGMA if task == "denoise" else 0.0


def add_probe_noise(probes: Sequence[Probe], sigma: float, seed: int = 0) -> list[Probe]:
    """Each probe plus Gaussian noise of ``sigma`` ([0, 1] units), clamped and rounded to 8 bits.

    Deterministic: probe ``i``'s noise depends only on ``(seed, i)``. The test stays exact under H0 (the
    key is independent of the probes, noisy or not); ``sigma = 0`` returns the probes unchanged.
    """
    if sigma < 0:
        raise ValueError(f"probe noise must be >= 0, got {sigma}")
    if sigma == 0:
        return list(probes)
    out = []
    for i, p in enumerate(probes):
        g = torch.Generator().manual_seed(seed * 1_000_003 + i)
        noisy = p.image + sigma * torch.randn(p.image.shape, generator=g)
        out.append(Probe(p.name, _quantise(noisy)))
    return out


def load_probes(spec: str, n: int, side: int, multiple: int = 1, noise: float = 0.0, seed: int = 0) -> list[Probe]:
    """Probes from an image spec (``corpus:benchmark``, a folder, ``dataset:NAME``; see ``load_images``),
    with Gaussian noise of ``noise`` ([0, 1] units, :func:`add_probe_noise`) when it is above 0."""
    return add_probe_noise(make_probes(load_images(spec, max_side=max(side * 4, 512)), n, side, multiple), noise,
                           seed)


def _quantise(x: torch.Tensor) -> torch.Tensor:
    from translators.images import quantize_8bit

    return quantize_8bit(x)


def module_translator(module: nn.Module) -> Translator:
    """A local suspect: its outputs rounded to 8 bits, as an API would serve them."""

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            y = module(x)
        if not isinstance(y, torch.Tensor) or y.dim() != 4 or y.shape[1] != 3:
            raise VerifyError(f"the suspect model returned {type(y).__name__} "
                              f"{tuple(y.shape) if isinstance(y, torch.Tensor) else ''}, not an image batch")
        return _quantise(y.float().cpu())

    return run


async def query_url(url: str, model: str, api_key: str, probes: Sequence[Probe],
                    timeout_s: float = 120.0) -> list[torch.Tensor]:
    """Each probe sent (PNG) to a Heist-compatible API with the attacker's client; decoded outputs.

    A probe follows :meth:`attacker.client.VictimClient.translate_retrying` with ``max_retries=2``: a transient
    5xx or transport error is retried (full-jitter backoff, ``Retry-After`` honoured), a 429 ``rate_limited``
    waited out; a refusal, a used-up quota or the retries spent raise :class:`VerifyError`."""
    from attacker.client import ClientConfig, VictimClient
    from attacker.errors import AttackError

    outs: list[torch.Tensor] = []
    try:
        async with VictimClient(url, ClientConfig(max_concurrency=1, max_retries=2, read_timeout_s=timeout_s)) as c:
            await c.model_info(model)
            for p in probes:
                try:
                    r = await c.translate_retrying(model, api_key, encode_image(p.image, "png"), "image/png",
                                                   what=f"probe {p.name}")
                except AttackError as exc:
                    raise VerifyError(f"suspect {url} model {model!r} did not answer probe {p.name}: {exc}") from None
                try:
                    outs.append(decode_image(r.body))
                except ImageError as exc:
                    raise VerifyError(f"suspect {url} answered probe {p.name} with a non-image ({exc})") from None
    except AttackError as exc:  # the client's words are for a thief's victim; here the server is the suspect
        raise VerifyError(f"suspect API: {str(exc).replace('the victim server', 'the suspect server')}") from None
    return outs


def _match(suspect: torch.Tensor, clean: torch.Tensor, name: str) -> torch.Tensor:
    if suspect.dim() == 3:
        suspect = suspect.unsqueeze(0)
    if suspect.shape[1] != 3:
        raise VerifyError(f"suspect output for probe {name} has {suspect.shape[1]} channels, not 3")
    if suspect.shape[-2:] != clean.shape[-2:]:
        (sh, sw), (ch, cw) = suspect.shape[-2:], clean.shape[-2:]
        if max(sh / ch, ch / sh, sw / cw, cw / sw) > 1.5:  # x4 SR against a x1 model: another task, not a copy
            raise VerifyError(f"suspect output for probe {name} is {sw}x{sh} where our model gives {cw}x{ch}: "
                              "the suspect does another task or scale than the model it is tested against")
        suspect = F.interpolate(suspect, size=clean.shape[-2:], mode="bicubic", align_corners=False).clamp(0, 1)
    return suspect


def verify_ownership(
    suspect_outputs: Sequence[torch.Tensor] | Translator,
    victim: Translator,
    probes: Sequence[Probe],
    secret: int,
    params: OwnershipParams | None = None,
    nuisance_jpeg: Sequence[int] = NUISANCE_JPEG,
    kept_jpeg: int | None = KEPT_JPEG,
) -> dict[str, Any]:
    """The ownership test on ``probes``.

    Args:
        suspect_outputs: the suspect's output per probe (``(1, 3, sH, sW)`` in [0, 1]), or a translator
            that computes them; outputs of a slightly different size are resized (bicubic) to the victim's,
            outputs more than 1.5x off in a side (another task or scale) are refused.
        victim: the clean victim (no defenses) ``(1, 3, H, W) -> (1, 3, sH, sW)``.
        probes: the probe images (sent to the suspect as they are).
        secret: the server's defense secret (``victim_service.services.defense_secret``).
        params: the ``ownership_watermark`` parameters the victim serves with (key id, radius).
        nuisance_jpeg: JPEG qualities whose error on the clean outputs is projected off the test (exact
            null either way; empty = none).
        kept_jpeg: JPEG quality of the optional second view, the key directions JPEG keeps (:data:`KEPT_JPEG`;
            ``None``, the default: the whole-key test alone).

    Returns:
        ``{"p_value", "cosine", "z", "statistic", "null", "probes", "key_dim", "max_z", "per_probe": [...],
        ...}``.
    """
    p = params or OwnershipParams()
    kept = None if kept_jpeg is None else functools.partial(jpeg_phase_average, quality=kept_jpeg)
    test = OwnershipTest(ownership_key(secret, p), p.key_space(), kept=kept, kept_rms=10.0 ** (-p.psnr / 20.0))
    t0 = time.perf_counter()
    for i, pr in enumerate(probes):
        with torch.no_grad():
            clean = victim(pr.image).float().cpu()
        out = suspect_outputs(pr.image) if callable(suspect_outputs) else suspect_outputs[i]
        test.add(clean, _match(out.float().cpu(), clean, pr.name), pr.name,
                 basis=feature_source(clean, pr.image.float(), p.source),
                 nuisances=[jpeg_roundtrip(clean, q) for q in nuisance_jpeg])
    res = test.result()
    res.update({"null": NULL_DESCRIPTION, "key_id": p.key_id, "radius": p.radius, "source": p.source,
                "carrier": p.carrier, "scales": list(p.scales), "colour": p.colour, "whiten": p.whiten,
                "nuisance_jpeg": list(nuisance_jpeg), "kept_jpeg": kept_jpeg,
                "per_probe": test.per_probe, "seconds": time.perf_counter() - t0,
                "probe_side": int(probes[0].image.shape[-1]) if probes else 0})
    return res


def ownership_pvalue(
    surrogate: nn.Module | Translator,
    victim: nn.Module | Translator,
    secret: int,
    params: OwnershipParams | None = None,
    images: str = "corpus:benchmark",
    queries: int = 32,
    side: int = 256,
    multiple: int = 16,
    noise: float = 0.0,
) -> dict[str, Any]:
    """Campaign scoring: the verify result (JSON-able dict) of a trained surrogate against our clean victim.

    ``multiple``: probe sides are multiples of it (U-Nets need ``2**depth``); ``noise``: probe noise sigma
    (:func:`probe_noise_for` gives the default for a task).
    """
    probes = load_probes(images, queries, side, multiple, noise)
    sur = module_translator(surrogate) if isinstance(surrogate, nn.Module) else surrogate
    vic = module_translator(victim) if isinstance(victim, nn.Module) else victim
    return verify_ownership(sur, vic, probes, secret, params)


def verify_url(url: str, model: str, api_key: str, victim: Translator, probes: Sequence[Probe], secret: int,
               params: OwnershipParams | None = None, nuisance_jpeg: Sequence[int] = NUISANCE_JPEG) -> dict[str, Any]:
    """:func:`verify_ownership` against a suspect served over HTTP."""
    outs = asyncio.run(query_url(url, model, api_key, probes))
    return verify_ownership(outs, victim, probes, secret, params, nuisance_jpeg)
