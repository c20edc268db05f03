"""Membership inference through the victim API (akd-membership-privacy, section II-B; eq. 3).

A candidate is a pair ``(x, y)``: an input and its true output. The attacker sends ``x`` through the
API and scores the reconstruction error of the answer ``G(x)`` against ``y``: members (training pairs)
are reproduced better than non-members. Scores are "higher = member":

- ``l1``: ``-mean |G(x) - y|``; ``l2``: ``-mean (G(x) - y)^2`` (the paper's attack, eq. 3);
- ``calibrated``: difficulty calibration (Watson et al., ICLR 2022): ``L2_ref(x, y) - L2_victim(x, y)``
  with a reference model the attacker trained on *public* pairs, so candidates that are simply easy
  do not look like members.

Candidate folders hold ``inputs/NAME.png`` and ``targets/NAME.png`` with the same names and sizes.
Every request goes through :class:`attacker.client.VictimClient`, so output defenses and rate limits
apply: queries are paced to the key's rate limit, and each one follows
:meth:`~attacker.client.VictimClient.translate_retrying` (a 429 is waited out, 5xx and transport errors are
retried up to ``max_retries``, a refusal or a used-up quota stops the attack), with no limit on 429 waits.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from attacker.client import ClientConfig, VictimClient, fetch_model_info
from attacker.errors import ConfigError, InputsRefusedError, QuotaExhaustedError
from attacker.files import check_out_folder
from attacker.pacing import LanePacer, PacedSender
from attacker.victim_info import ModelInfo
from translators.codecs import decode_image, encode_image, read_image
from translators.files import atomic_write_json

log = logging.getLogger(__name__)
SCORES = ("l1", "l2", "calibrated")
FPR_LEVELS = (0.01, 0.001)


@dataclass(frozen=True)
class Candidate:
    """One candidate pair; ``x`` and ``y`` are ``(1, 3, H, W)`` in [0, 1]."""

    name: str
    x: torch.Tensor
    y: torch.Tensor


def load_candidates(folder: str | Path, what: str) -> list[Candidate]:
    """The pairs in ``folder`` (``inputs/`` + ``targets/``); raises :class:`ConfigError` (one line) if they
    do not pair up, differ in size, or there are none."""
    root = Path(folder)
    ins, outs = root / "inputs", root / "targets"
    if not ins.is_dir() or not outs.is_dir():
        raise ConfigError(f"{what} {root}: needs subfolders inputs/ and targets/ with one PNG per pair name")
    a = {p.stem: p for p in sorted(ins.iterdir()) if p.suffix.lower() == ".png"}
    b = {p.stem: p for p in sorted(outs.iterdir()) if p.suffix.lower() == ".png"}
    if not a:
        raise ConfigError(f"{what} {root}: no pairs (inputs/ holds no PNG)")
    if a.keys() != b.keys():
        odd = sorted(a.keys() ^ b.keys())
        raise ConfigError(f"{what} {root}: inputs/ and targets/ do not pair up ({len(odd)} unmatched, e.g. {odd[0]!r})")
    out = []
    for name in a:
        x, y = read_image(a[name]), read_image(b[name])
        if x.shape != y.shape:
            raise ConfigError(f"{what} {root}: pair {name!r} has input {tuple(x.shape[-2:])} but target "
                              f"{tuple(y.shape[-2:])}; a membership candidate needs a same-size pair")
        out.append(Candidate(name, x, y))
    return out


def check_candidates(info: ModelInfo, members: list[Candidate], non_members: list[Candidate]) -> None:
    """One-line errors before any query: same-size model, sizes it accepts, name clashes."""
    if info.scale != 1:
        raise ConfigError(f"model {info.name!r} is not a same-size translator (scale {info.scale}); the "
                          "reconstruction-loss attack compares G(x) with y pixel by pixel")
    for c in (*members, *non_members):
        why = info.accepts(*c.x.shape[-2:])
        if why:
            raise ConfigError(f"candidate {c.name!r}: model {info.name!r} refuses its size ({why})")
    clash = {c.name for c in members} & {c.name for c in non_members}
    if clash:
        raise ConfigError(f"members and non-members share pair names (e.g. {sorted(clash)[0]!r})")


async def _query_all(url: str, key: str, model: str, cands: list[Candidate], concurrency: int,
                     on_done: Callable[[], None] | None) -> tuple[dict[str, torch.Tensor], int]:
    sem = asyncio.Semaphore(concurrency)
    outputs: dict[str, torch.Tensor] = {}
    sent = 0

    async with VictimClient(url, ClientConfig(max_concurrency=concurrency)) as client:
        await client.model_info(model)
        # the harvester's pacing: as fast as the key's rate limit allows; a 429 is a wait, not a failure
        sender = PacedSender(LanePacer(max_concurrency=concurrency))

        async def one(c: Candidate) -> None:
            nonlocal sent
            body = encode_image(c.x)
            async with sem:
                try:
                    # 429s are waits (the pacer sees them too), never errors: no limit on how many
                    out = await client.translate_retrying(model, key, body, what=f"candidate {c.name!r}",
                                                          max_rate_waits=None, send=sender.send)
                except QuotaExhaustedError as exc:
                    raise QuotaExhaustedError(f"{exc}; membership inference needs {len(cands)} queries, "
                                              f"{len(outputs)} answered") from None
                except InputsRefusedError as exc:
                    raise ConfigError(str(exc)) from None  # a candidate this victim does not take
                sent += out.attempts
                outputs[c.name] = decode_image(out.body)
            if on_done:
                on_done()

        tasks = [asyncio.create_task(one(c)) for c in cands]
        try:
            await asyncio.gather(*tasks)
        finally:  # one failed (or we were cancelled): stop the others and wait for them, leaking nothing
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    return outputs, sent


def load_reference(path: str | Path, candidates: list[Candidate]) -> torch.nn.Module:
    """Load the reference model of the calibrated score and check it fits ``candidates``: a same-size (x1)
    model whose size rules (``min_side``, ``size_multiple``) accept every candidate. Raises a one-line
    :class:`ConfigError` (or :class:`~translators.errors.CheckpointError`) before any query is sent."""
    from translators.checkpoint import load_model

    loaded = load_model(path)
    card = loaded.card
    if card.scale != 1:
        raise ConfigError(f"--reference {path}: a x{card.scale} {card.task} model; the calibrated score compares "
                          "its output with the candidates' targets pixel by pixel, so it needs a same-size (x1) "
                          "model such as `heist attack mia-reference` trains")
    for c in candidates:
        h, w = (int(v) for v in c.x.shape[-2:])
        if min(h, w) < card.min_side or h % card.size_multiple or w % card.size_multiple:
            raise ConfigError(f"--reference {path}: candidate {c.name!r} is {w}x{h} but the reference takes "
                              f"sides of at least {card.min_side} px in multiples of {card.size_multiple}; train "
                              f"one with `heist attack mia-reference --side {h}`")
    return loaded.module


def reference_l2(reference: torch.nn.Module, candidates: list[Candidate]) -> list[float]:
    """The reference model's ``l2`` score of every candidate (run before any query, so a reference that does
    not fit fails as a one-line :class:`ConfigError` without wasting the victim's quota)."""
    out = []
    with torch.no_grad():
        for c in candidates:
            try:
                g = reference(c.x)
            except RuntimeError as exc:
                raise ConfigError(f"the reference model fails on candidate {c.name!r} "
                                  f"({str(exc).splitlines()[0][:200]}); use a reference for this candidate size "
                                  "(`heist attack mia-reference --side`)") from None
            if g.shape != c.y.shape:
                raise ConfigError(f"the reference model maps candidate {c.name!r} {tuple(c.x.shape[-2:])} to "
                                  f"{tuple(g.shape[-2:])}, not the target's {tuple(c.y.shape[-2:])}; it needs a "
                                  "same-size (x1) reference")
            out.append(reconstruction_scores(g.clamp(0, 1), c.y)["l2"])
    return out


def reconstruction_scores(out: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """``{"l1": -mean|out-y|, "l2": -mean (out-y)^2}`` for one pair (higher = more member-like)."""
    d = out.float() - y.float()
    return {"l1": -float(d.abs().mean()), "l2": -float(d.square().mean())}


@dataclass
class MiaResult:
    """Per-candidate scores and labels (1 = member); written to ``OUT/scores.json``."""

    names: list[str]
    labels: list[int]
    scores: dict[str, list[float]]
    queries: int
    outputs: dict[str, torch.Tensor]
    seconds: float


def query_outputs(url: str, key: str, model: str, cands: list[Candidate], concurrency: int = 4,
                  on_done: Callable[[], None] | None = None) -> tuple[dict[str, torch.Tensor], int]:
    """Each candidate's served output (by name) and the requests sent, as fast as the key's rate limit
    allows (429s are waits); ``on_done`` is called after each candidate."""
    return asyncio.run(_query_all(url, key, model, cands, concurrency, on_done))


def run_mia(
    url: str, key: str, model: str, members: list[Candidate], non_members: list[Candidate],
    reference: torch.nn.Module | None = None, concurrency: int = 4, on_done: Callable[[], None] | None = None,
) -> MiaResult:
    """Query every candidate once through the API and score it (see the module docstring)."""
    if not members or not non_members:
        raise ConfigError("membership inference needs at least one member and one non-member")
    info = fetch_model_info(url, model)
    check_candidates(info, members, non_members)
    cands = [*members, *non_members]
    ref_l2 = reference_l2(reference, cands) if reference is not None else None
    t0 = time.perf_counter()
    outputs, sent = query_outputs(url, key, model, cands, concurrency, on_done)
    seconds = time.perf_counter() - t0
    scores: dict[str, list[float]] = {s: [] for s in SCORES if s != "calibrated" or reference is not None}
    for i, c in enumerate(cands):
        s = reconstruction_scores(outputs[c.name], c.y)
        scores["l1"].append(s["l1"])
        scores["l2"].append(s["l2"])
        if ref_l2 is not None:
            scores["calibrated"].append(s["l2"] - ref_l2[i])
    labels = [1] * len(members) + [0] * len(non_members)
    return MiaResult([c.name for c in cands], labels, scores, sent, outputs, seconds)


def write_scores(result: MiaResult, out: Path) -> Path:
    """``OUT/scores.json``: per-candidate scores and labels (atomic write)."""
    check_out_folder(out)
    out.mkdir(parents=True, exist_ok=True)
    return atomic_write_json(out / "scores.json", {
        "names": result.names, "labels": result.labels, "scores": result.scores, "queries": result.queries,
        "seconds": round(result.seconds, 3)}, durable=False)


def public_pairs(images: str, side: int, n: int, seed: int = 0) -> list[Candidate]:
    """``n`` public edge -> photo pairs (``side`` crops of ``images``): the attacker knows the public task."""
    from translators.zoo.membership import edge_pairs

    try:
        return [Candidate(f"pub{i:04d}", x, y) for i, (x, y) in enumerate(edge_pairs(images, side, n, seed))]
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def train_reference(images: str, side: int, steps: int, out: Path, seed: int = 0, n_pairs: int = 256,
                    arch_kwargs: dict[str, object] | None = None) -> Path:
    """Train the attacker's reference model (U-Net, L1) on public pairs; save it as a checkpoint.

    Returns the path written (``out`` with the ``.safetensors`` suffix; its card is beside it). Raises a
    one-line :class:`ConfigError` when ``side`` does not suit the U-Net or ``out`` cannot be written."""
    from translators.archs import build_arch
    from translators.checkpoint import ModelCard, save_checkpoint
    from translators.training import fit
    from translators.zoo.membership import PRIVATE_IMAGE_SETS

    if images.strip() in PRIVATE_IMAGE_SETS:
        raise ConfigError(f"--images {images}: holds the membership victim's private crops (its members); a "
                          "reference trained on them finds members easy and the calibrated score means nothing; "
                          "use public images such as corpus:attacker")
    out = Path(out)
    check_out_folder(out.parent)
    if out.is_dir():
        raise ConfigError(f"--out {out}: is a folder; name the checkpoint file to write (e.g. {out / 'ref'}"
                          ".safetensors)")
    if out.suffix not in ("", ".safetensors"):
        raise ConfigError(f"--out {out}: the reference is written as NAME.safetensors (+ NAME.json); name it so")
    kwargs = arch_kwargs or {"base": 24, "depth": 4, "max_channels": 96, "norm": "none", "residual": False}
    torch.manual_seed(seed)
    model = build_arch("unet", kwargs)
    mult = int(getattr(model, "size_multiple", 1) or 1)
    if side % mult or side < mult:
        raise ConfigError(f"--side {side}: the reference U-Net needs a multiple of {mult} (it halves the crop "
                          f"{mult.bit_length() - 1} times), e.g. {max(mult, side // mult * mult)} or "
                          f"{(side // mult + 1) * mult}")
    pairs = public_pairs(images, side, n_pairs, seed)
    g = torch.Generator().manual_seed(seed)

    def batches(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(len(pairs), (8,), generator=g).tolist()
        return torch.cat([pairs[i].x for i in idx]), torch.cat([pairs[i].y for i in idx])

    fit(model, batches, steps, lr=2e-3, loss="l1")
    card = ModelCard(name="mia-reference", arch="unet", kwargs=kwargs, task="edges2photo",
                     size_multiple=int(model.size_multiple), min_side=int(model.size_multiple),
                     description="attacker's reference model for difficulty calibration (public pairs)",
                     training={"images": images, "pairs": n_pairs, "steps": steps, "seed": seed})
    return save_checkpoint(model, out, card)
