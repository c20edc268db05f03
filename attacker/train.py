"""Surrogate training on harvested pairs: data, held-out split, resumable loop, fidelity, checkpoint.

Pairs are held in memory as uint8. Each step's batch is a pure function of ``(seed, step)``: random
crops (``patch`` input pixels, ``scale * patch`` output pixels, the same place in both) from pairs chosen
with probability proportional to their number of crop positions, at offsets that are multiples of
``align`` input pixels from the query's corner, and (``augment``) each under one of the 8 dihedral
transforms. So a resumed run sees exactly the batches an uninterrupted one would, with or without
DataLoader workers, and on CPU ends with bit-identical weights.

Why the defaults are ``align = 8`` and no dihedral augmentation: a victim with strided layers (a pix2pix
U-Net, any CNN that downsamples, a transformer's patch grid) answers by a pixel's position modulo its
stride, counted from the corner of the query it received, and no trained network commutes exactly with
flips. Measured on the zoo's ``style-ink`` U-Net (benchmark photos, 256 px; ``bench/victim_symmetry.py``):
shifting its input by 1, 2, 4, 8 px changes its output by 30.3, 34.0, 47.6, 59.3 dB PSNR, flipping or
rotating it by 30.2-31.4 dB; the other U-Nets by 36.7-39.6 dB, the stride-1 DnCNNs and SRResNets are exactly
shift-equivariant but 36.7-50 dB from flip-equivariant. A surrogate trained on flipped crops learns the
average of the victim's 8 dihedral versions, and one trained on crops at every offset the average over
its phases: error floors of about those sizes. Crops aligned to 8 px keep the victim's phase (modulo 8)
and the 3-level ``resunet``'s own fixed, and unflipped crops keep its orientation: +1.0 dB on
``style-ink`` (64 queries), +1.1 on ``style-toon`` and ``style-grade`` (16), +0.2 on ``sr4x`` (16), +0.1
on ``denoise25`` from one query (docs/attacker.md, ``bench/train_ablation.py``).

Held-out data (never trained on) measures fidelity: ``max(1, round(val_fraction * N))`` pairs (at most
``max_val_pairs``) chosen by seed; with a single pair, a stripe of it along the longer side (a quarter)
is held out instead, as the single-example paper tests on unseen regions. ``val_split="stripes"`` holds
out a stripe at the end of *every* pair's longer side (``val_fraction`` of it, 16 px at least) instead of
whole pairs, scored with :data:`STRIPE_CONTEXT` input pixels of the training side in front of it (so the
surrogate's border padding is not what is measured; the context is not scored). It was built because two
held-out pairs of a 16-pair harvest may both be easy (on ``style-ink`` they scored 8 dB above the
training pairs). Measured twice on ``style-ink`` from 16 queries (``bench/train_ablation.py``), stripes
gave 30.51 and 30.90 dB on the benchmark photos, whole pairs 30.86 and 30.01: the differences follow the
steps each run got on a shared machine, not the split, so whole pairs stay the default.

Stopping: at the profile's ``steps`` (a cap), after ``time_budget`` seconds, or when held-out PSNR stops
improving: every ``val_every`` steps it is measured (also at step 0); ``patience`` validations without a
gain of ``min_delta_db``, when the best is also more than ``plateau_fraction`` of the run's steps old,
divide the learning rate by 3, and after ``lr_drops`` such drops training stops. (The age condition makes
the rule scale-free: a few held-out pairs saturate early while training still gains on the rest; on
``style-ink`` from 16 queries, stopping after 4 flat validations cost 1.2 dB against the benchmark.)
Between drops the rate follows a half cosine from the profile's ``lr`` to ``lr_floor`` times it over
the run (by time under a ``time_budget``, else by steps; :func:`lr_factor`).
The checkpoint holds the weights of the best validation, so a ``resunet`` surrogate (which starts *as*
the trivial baseline) never scores below the baseline on held-out pairs. ``arch="auto"`` trains each
candidate (:func:`attacker.surrogates.auto_candidates`) for ``auto_trial`` of the budget on the same
batches and continues the best one; the first candidate (``resunet``, which starts as the baseline) is
kept unless another beats its trial by ``auto_margin_db`` on held-out pairs, and when the continued
candidate still ends below the first one's trial, the first one's weights are returned instead.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import math
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn
from torch.utils.data import DataLoader, Dataset

from attacker.countermeasures import build_counter
from attacker.errors import ConfigError, TrainingError
from attacker.fidelity import baseline, psnr_ssim_l2, translate
from attacker.files import check_out_folder, folder_lock, read_json
from attacker.pairstore import MANIFEST, PairStore
from attacker.progress import NO_PROGRESS, ProgressHook
from attacker.runinfo import read_run, update_run
from attacker.surrogates import Surrogate, SurrogateProfile, auto_candidates, get_surrogate
from attacker.trainstate import fingerprint, load_state, save_state
from translators.checkpoint import ModelCard, save_checkpoint
from translators.device import pick_device
from translators.errors import first_problem
from translators.files import atomic_write_json
from translators.images import to_uint8_tensor

log = logging.getLogger(__name__)
ArchValue = int | float | bool | str
DEFAULT_ADVICE = "harvest more or larger queries, or train longer (--time-budget)"  # `heist attack train`'s options
STRIPE_CONTEXT = 16  # input pixels of the training side fed in front of a held-out stripe, not scored


class TrainConfig(BaseModel):
    """Options of :func:`train_surrogate`. ``None`` fields take the profile's value.

    Attributes:
        arch: surrogate kind (``resunet``, ``pix2pix``, ``srresnet``, ``unet-l2``) or ``auto``: try
            ``resunet`` and the papers' surrogate for the task (SR: srresnet, denoise: unet-l2, else
            pix2pix) briefly, keep the better on held-out pairs.
        steps: most optimisation steps (default: the profile's cap).
        time_budget: seconds of training (trials included) after which training stops; None = no limit.
        patience, min_delta_db, lr_drops, plateau_fraction: the plateau rule (module docstring).
        schedule: ``cosine`` also decays the learning rate from the profile's to ``lr_floor`` times it
            along a half cosine over the run (by time when there is a ``time_budget``, else by steps);
            ``plateau`` keeps it constant between plateau drops.
        auto_trial: share of the time budget (or of ``steps``) each ``auto`` candidate trains for.
        auto_margin_db: held-out PSNR (dB) by which another candidate's trial must beat the first
            (``resunet``) to be chosen: a few short trials judged on a few held-out pairs are noisy.
        profile: ``tiny`` (tests), ``small`` (CPU), ``default``, ``full`` (GPU).
        patch: training crop side in input pixels (clamped to the smallest training input).
        align: training crops (and held-out centre crops) start at multiples of this many input pixels from
            each pair's corner (the victim's sampling grid; module docstring). 1 = anywhere.
        augment: apply one of the 8 dihedral transforms to each training crop (off by default: module
            docstring; the ownership-watermark benches turn it on as a thief's counter-measure).
        arch_kwargs: overrides of the profile's generator kwargs (e.g. ``{"depth": 3}``).
        workers: DataLoader worker processes (0 = build batches in the training process).
        threads: ``torch.set_num_threads`` for this process (None = torch's default). On a loaded
            machine fewer threads than cores can be many times faster (OpenMP threads spin-wait).
        val_max_side: held-out pairs are centre-cropped to this many input pixels a side.
        val_split: ``pairs`` (hold out whole pairs), ``sources`` (hold out every pair of whole source photos,
            so held-out PSNR measures photos the surrogate never saw; falls back to ``pairs`` when the
            manifest names fewer than two sources) or ``stripes`` (a stripe of every pair; module docstring).
        ema: decay of an exponential moving average of the generator's weights (Polyak averaging), with the
            warm-up ``min(ema, (1 + step) / (10 + step))``; when > 0 the average, not the raw weights, is
            validated and kept as the best. 0 = off.
        counter: counter-measure spec applied to every harvested output before training
            (:mod:`attacker.countermeasures`, e.g. ``lowpass:sigma=1.5``, ``aware``).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    arch: str = "auto"
    profile: str = "small"
    steps: int | None = Field(None, ge=1)
    batch_size: int | None = Field(None, ge=1)
    patch: int | None = Field(None, ge=4)
    lr: float | None = Field(None, gt=0)
    arch_kwargs: dict[str, ArchValue] = Field(default_factory=dict)
    seed: int = 0
    device: str = "auto"
    threads: int | None = Field(None, ge=1)
    amp: bool = True
    workers: int = Field(0, ge=0)
    augment: bool = False
    align: int = Field(8, ge=1)
    val_fraction: float = Field(0.1, ge=0, lt=1)
    max_val_pairs: int = Field(32, ge=1)
    val_max_side: int = Field(128, ge=8)
    val_split: Literal["pairs", "sources", "stripes"] = "pairs"
    ema: float = Field(0.0, ge=0.0, lt=1.0)
    val_every: int | None = Field(None, ge=1)
    time_budget: float | None = Field(300.0, gt=0)
    patience: int = Field(4, ge=1)
    min_delta_db: float = Field(0.02, ge=0)
    lr_drops: int = Field(2, ge=0)
    plateau_fraction: float = Field(0.25, ge=0, lt=1)
    schedule: Literal["plateau", "cosine"] = "cosine"
    lr_floor: float = Field(0.05, gt=0, le=1)
    auto_trial: float = Field(0.1, gt=0, le=0.5)
    auto_margin_db: float = 0.5
    checkpoint_every: int | None = Field(None, ge=1)
    log_every: int = Field(10, ge=1)
    restart: bool = False
    counter: str = "none"


@dataclass
class PairSet:
    """Pairs in memory: ``inputs[i]`` ``(3, h, w)`` uint8, ``outputs[i]`` ``(3, s*h, s*w)`` uint8;
    ``sources[i]`` the attacker's photo the query was cut from (empty list: unknown)."""

    ids: list[str]
    inputs: list[torch.Tensor]
    outputs: list[torch.Tensor]
    scale: int
    sources: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)


def _u8(x: torch.Tensor) -> torch.Tensor:
    return to_uint8_tensor(x[0])


def resolve_pairs_dir(path: str | Path) -> tuple[Path, Path | None]:
    """``(pairs folder, run folder or None)`` for a run folder (holding ``pairs/``) or a pairs folder."""
    p = Path(path)
    if (p / "pairs" / MANIFEST).exists():
        return p / "pairs", p
    if (p / MANIFEST).exists():
        run = p.parent if (p.parent / "run.json").exists() else None
        return p, run
    raise TrainingError(f"{p}: no pairs here (expected {p}/pairs/{MANIFEST}); run `heist attack harvest` first")


def load_pairs(pairs_dir: Path) -> PairSet:
    """Read every ``ok`` pair; drop (with a warning) pairs whose output is not an integer upscaling."""
    store = PairStore(pairs_dir).open(writable=False)
    recs = store.ok_records()
    if not recs:
        raise TrainingError(f"{pairs_dir}: the manifest holds no pairs yet")
    ids, ins, outs, scales, sources = [], [], [], [], []
    for rec in recs:
        x, y = store.load_pair(rec)
        ids.append(rec.id)
        sources.append(rec.source)
        ins.append(_u8(x))
        outs.append(_u8(y))
        h, w = x.shape[-2:]
        sh, sw = y.shape[-2:]
        scales.append(sh // h if sh % h == 0 and sw % w == 0 and sh // h == sw // w else 0)
    scale = max(set(scales), key=scales.count)
    if scale == 0:
        raise TrainingError(f"{pairs_dir}: victim outputs are not integer upscalings of the inputs")
    keep = [i for i, s in enumerate(scales) if s == scale]
    if len(keep) < len(ids):
        log.warning("dropping %d pair(s) whose output size is not %dx the input", len(ids) - len(keep), scale)
    return PairSet([ids[i] for i in keep], [ins[i] for i in keep], [outs[i] for i in keep], scale,
                   [sources[i] for i in keep])


@dataclass
class Split:
    """Training pairs and held-out data. ``val_boxes[i]``: the scored part of ``val_targets[i]`` as
    ``(top, left, height, width)`` output pixels, or None for all of it (stripes carry context)."""

    train: PairSet
    val_inputs: list[torch.Tensor]  # (1, 3, h, w) float
    val_targets: list[torch.Tensor]
    held_out: Literal["pairs", "sources", "region", "stripes", "none"]
    val_ids: list[str] = field(default_factory=list)
    val_boxes: list[tuple[int, int, int, int] | None] = field(default_factory=list)

    def scored(self, i: int, pred: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(pred, target)`` of held-out item ``i`` cut to its scored box."""
        y = self.val_targets[i]
        box = self.val_boxes[i] if self.val_boxes else None
        if box is None:
            return pred, y
        t, le, h, w = box
        return pred[..., t : t + h, le : le + w], y[..., t : t + h, le : le + w]


def _center_crop_pair(x: torch.Tensor, y: torch.Tensor, side: int, scale: int,
                      align: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """The centre ``side`` crop of a pair, its offset rounded down to a multiple of ``align`` input pixels."""
    h, w = x.shape[-2:]
    ch, cw = min(h, side), min(w, side)
    t, le = (h - ch) // 2 // align * align, (w - cw) // 2 // align * align
    return (x[..., t : t + ch, le : le + cw],
            y[..., t * scale : (t + ch) * scale, le * scale : (le + cw) * scale])


def scored_on(held_out: str) -> str:
    """What a surrogate's fidelity was measured on, for messages: ``held-out pairs`` (``sources``, ``region``,
    ``stripes``), or the training pairs themselves when ``held_out`` is ``"none"`` (too few or too small
    pairs to spare any: an optimistic score, not a held-out one)."""
    return "the training pairs (nothing held out)" if held_out == "none" else f"held-out {held_out}"


def split_pairs(ps: PairSet, cfg: TrainConfig, min_train_side: int) -> Split:
    """Hold out pairs (or, with one pair, a stripe of it) for validation; see module docstring."""
    s = ps.scale

    def f(t: torch.Tensor) -> torch.Tensor:
        return t.unsqueeze(0).float().div(255.0)

    def val_of(xs: list[torch.Tensor], ys: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        vx, vy = [], []
        for x, y in zip(xs, ys):
            cx, cy = _center_crop_pair(f(x), f(y), cfg.val_max_side, s, cfg.align)
            vx.append(cx)
            vy.append(cy)
        return vx, vy

    n = len(ps)
    if n >= 2 and cfg.val_fraction > 0 and cfg.val_split == "stripes":
        striped = _stripe_split(ps, cfg, min_train_side)
        if striped is not None:
            return striped
    if n >= 2 and cfg.val_fraction > 0:
        n_val = min(cfg.max_val_pairs, max(1, round(cfg.val_fraction * n)), n - 1)
        held = _held_out_sources(ps, n_val, cfg.seed) if cfg.val_split == "sources" else None
        kind: Literal["pairs", "sources"] = "sources" if held else "pairs"
        if held:  # every pair of the held-out photos stays out of training; at most max_val_pairs are scored
            val = sorted(random.Random(f"heist:val:{cfg.seed}").sample(held, min(len(held), cfg.max_val_pairs)))
        else:
            order = sorted(range(n), key=lambda i: ps.ids[i])
            random.Random(f"heist:val:{cfg.seed}").shuffle(order)
            held = val = sorted(order[:n_val])
        out = set(held)
        tr = [i for i in range(n) if i not in out]
        vx, vy = val_of([ps.inputs[i] for i in val], [ps.outputs[i] for i in val])
        train = PairSet([ps.ids[i] for i in tr], [ps.inputs[i] for i in tr], [ps.outputs[i] for i in tr], s,
                        [ps.sources[i] for i in tr] if ps.sources else [])
        return Split(train, vx, vy, kind, [ps.ids[i] for i in val])
    if n == 1 and cfg.val_fraction > 0:
        x, y = ps.inputs[0], ps.outputs[0]
        long_side = max(x.shape[-2:])
        cut = (long_side - max(8, long_side // 4)) // cfg.align * cfg.align  # the stripe starts on the grid
        if cut >= min_train_side:
            tx, ty, vx_, vy_ = _cut_long_side(x, y, cut, cut, s)
            vx, vy = val_of([vx_], [vy_])
            return Split(PairSet(ps.ids, [tx.contiguous()], [ty.contiguous()], s), vx, vy, "region", ps.ids)
    vx, vy = val_of(ps.inputs, ps.outputs)
    return Split(ps, vx, vy, "none", [])


def _held_out_sources(ps: PairSet, n_val: int, seed: int) -> list[int] | None:
    """Indices of every pair of whole source photos, drawn in a seeded order until at least ``n_val``
    pairs are held out; None when the sources are unknown or fewer than two (nothing would be left to
    train on, or nothing unseen to hold out). Never holds out every source."""
    if not ps.sources or len(set(ps.sources)) < 2:
        return None
    names = sorted(set(ps.sources))
    random.Random(f"heist:val-sources:{seed}").shuffle(names)
    val: list[int] = []
    for name in names[:-1]:
        val += [i for i, src in enumerate(ps.sources) if src == name]
        if len(val) >= n_val:
            break
    return sorted(val)


def _cut_long_side(x: torch.Tensor, y: torch.Tensor, cut: int, start: int,
                   scale: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split a pair along its longer side (the width on ties): ``x[..., :cut]`` with its output for
    training, ``x[..., start:]`` (``start <= cut``: the held-out end with ``cut - start`` pixels of
    context) with its output for validation. Input pixels; outputs are ``scale`` times larger. Contiguous."""
    dim = -1 if x.shape[-1] >= x.shape[-2] else -2
    parts = (x.narrow(dim, 0, cut), y.narrow(dim, 0, cut * scale),
             x.narrow(dim, start, x.shape[dim] - start), y.narrow(dim, start * scale, y.shape[dim] - start * scale))
    tx, ty, ex, ey = (t.contiguous() for t in parts)
    return tx, ty, ex, ey


def _stripe_split(ps: PairSet, cfg: TrainConfig, min_train_side: int) -> Split | None:
    """Hold out a stripe at the end of every pair's longer side; None when no pair is long enough.

    Stripe width ``v = max(16, ceil(val_fraction * long side))`` input pixels, capped so that stripe and
    context fit in ``val_max_side``; a pair shorter than ``4 v`` or than ``v + max(min_train_side, 16)``
    is kept whole for training. Each held-out input is the stripe with up to :data:`STRIPE_CONTEXT`
    pixels of the training side before it, centre-cropped along its length to ``val_max_side``.
    """
    s = ps.scale
    keep_min = max(min_train_side, 16)
    ids, xs, ys = [], [], []
    vx, vy, boxes, vids = [], [], [], []
    for pid, x, y in zip(ps.ids, ps.inputs, ps.outputs):
        h, w = x.shape[-2:]
        along_w = w >= h
        long_side = max(h, w)
        v = min(max(16, math.ceil(cfg.val_fraction * long_side)), cfg.val_max_side - STRIPE_CONTEXT)
        cut = long_side - v
        if cut < keep_min or 4 * v > long_side:
            ids.append(pid)
            xs.append(x)
            ys.append(y)
            continue
        ctx = min(STRIPE_CONTEXT, cut)
        tx, ty, ex, ey = _cut_long_side(x, y, cut, cut - ctx, s)
        ids.append(pid)
        xs.append(tx)
        ys.append(ty)
        cx, cy = _center_crop_pair(ex.unsqueeze(0).float().div(255.0), ey.unsqueeze(0).float().div(255.0),
                                   cfg.val_max_side, s)
        oh, ow = cy.shape[-2:]
        boxes.append((0, ctx * s, oh, ow - ctx * s) if along_w else (ctx * s, 0, oh - ctx * s, ow))
        vx.append(cx.contiguous())
        vy.append(cy.contiguous())
        vids.append(pid)
    if not vx:
        return None
    return Split(PairSet(ids, xs, ys, s), vx, vy, "stripes", vids, boxes)


class BatchSource(Dataset):
    """Item ``k`` is the batch of step ``start + k``: ``(B, 3, p, p)`` and ``(B, 3, s*p, s*p)`` uint8."""

    def __init__(self, ps: PairSet, patch: int, batch: int, seed: int, start: int, stop: int, augment: bool,
                 align: int) -> None:
        self.ps, self.patch, self.batch, self.seed = ps, patch, batch, seed
        self.start, self.stop, self.augment, self.align = start, stop, augment, align
        self.weights = [((x.shape[-2] - patch) // align + 1) * ((x.shape[-1] - patch) // align + 1)
                        for x in ps.inputs]  # crop positions on the grid

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __getitem__(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        step = self.start + k
        rng = random.Random(f"heist:batch:{self.seed}:{step}")
        p, s = self.patch, self.ps.scale
        xs, ys = [], []
        for _ in range(self.batch):
            i = rng.choices(range(len(self.ps)), weights=self.weights, k=1)[0]
            x, y = self.ps.inputs[i], self.ps.outputs[i]
            t = rng.randrange(0, x.shape[-2] - p + 1, self.align)
            le = rng.randrange(0, x.shape[-1] - p + 1, self.align)
            cx = x[:, t : t + p, le : le + p]
            cy = y[:, t * s : (t + p) * s, le * s : (le + p) * s]
            if self.augment:
                k_rot, flip = rng.randrange(4), rng.random() < 0.5
                cx, cy = torch.rot90(cx, k_rot, (-2, -1)), torch.rot90(cy, k_rot, (-2, -1))
                if flip:
                    cx, cy = cx.flip(-1), cy.flip(-1)
            xs.append(cx)
            ys.append(cy)
        return torch.stack(xs), torch.stack(ys)


@dataclass
class TrainResult:
    """What :func:`train_surrogate` produced. ``fidelity``/``baseline``: PSNR (dB), SSIM, L2 on held-out
    pairs, surrogate vs victim and trivial baseline vs victim."""

    checkpoint: Path
    card: ModelCard
    fidelity: dict[str, float | None]
    baseline: dict[str, float | None]
    held_out: str
    steps: int
    loss_curve: list[list[float]]
    val_curve: list[dict[str, float | None]]
    wall_s: float
    images_per_s: float
    summary: dict[str, Any]
    run_json: Path | None = None


@torch.no_grad()
def _validate(g: nn.Module, device: torch.device, split: Split) -> dict[str, float | None]:
    was = g.training
    g.eval()
    scores = [psnr_ssim_l2(*split.scored(i, translate(g, x, device))) for i, x in enumerate(split.val_inputs)]
    g.train(was)
    return _mean_scores(scores)


def _baseline_scores(split: Split, scale: int) -> dict[str, float | None]:
    return _mean_scores([psnr_ssim_l2(*split.scored(i, baseline(x, scale))) for i, x in enumerate(split.val_inputs)])


MODEL_SUFFIXES = {".safetensors", ".pt", ".pth", ".ts", ".pt2", ".onnx", ".json", ".ckpt", ".bin"}


def _check_surrogate_folder(out_dir: Path, pairs_dir: Path) -> None:
    """Refuse an ``--out`` that reads as a file name (``model.pt``: the checkpoint goes *into* the folder,
    as ``model.safetensors``) or that is the harvest's pairs folder (training would write into it)."""
    if not out_dir.exists() and out_dir.suffix.lower() in MODEL_SUFFIXES:
        raise ConfigError(f"--out {out_dir}: names a folder (the checkpoint is written as "
                          f"{out_dir / 'model.safetensors'}); drop the {out_dir.suffix} or name a folder")
    if out_dir.resolve() == pairs_dir.resolve() or pairs_dir.resolve() in out_dir.resolve().parents:
        raise ConfigError(f"--out {out_dir}: inside the pairs folder {pairs_dir}; name another folder "
                          "(default: RUN/surrogate)")


def _mean_scores(scores: list[dict[str, float]]) -> dict[str, float | None]:
    """Each score's mean over the held-out pairs where it is defined (SSIM is ``nan`` for a pair with a side
    under its 11 px window); None when no pair has it, so ``run.json`` never holds a NaN."""
    out: dict[str, float | None] = {}
    for k in scores[0]:
        vals = [sc[k] for sc in scores if math.isfinite(sc[k])]
        out[k] = float(sum(vals) / len(vals)) if vals else None
    return out


def _resolve_profile(kind: type[Surrogate], cfg: TrainConfig) -> SurrogateProfile:
    if cfg.profile not in kind.profiles:
        raise ConfigError(f"unknown profile {cfg.profile!r} for {kind.name}; use {', '.join(kind.profiles)}")
    base = kind.profiles[cfg.profile]
    update: dict[str, Any] = {k: v for k, v in {"steps": cfg.steps, "batch": cfg.batch_size, "patch": cfg.patch,
                                                 "lr": cfg.lr}.items() if v is not None}
    if cfg.arch_kwargs:
        update["arch_kwargs"] = {**base.arch_kwargs, **cfg.arch_kwargs}
    try:
        return SurrogateProfile.model_validate({**base.model_dump(), **update})
    except ValidationError as exc:
        raise ConfigError(f"bad training option: {exc.errors()[0]['msg']}") from None


@dataclass
class _Loop:
    """One surrogate in training and its loop state (all of it goes into ``train_state/state.json``).

    ``best`` holds the generator weights of the best held-out PSNR so far; ``lr_factor`` multiplies the
    profile's learning rate and is divided by :data:`LR_DROP` on each plateau.
    """

    kind: str
    sur: Surrogate
    patch: int
    best: nn.Module
    avg: nn.Module | None = None
    step: int = 0
    lr_factor: float = 1.0
    lr: float = 0.0
    best_psnr: float = -math.inf
    best_step: int = 0
    best_scores: dict[str, float] = field(default_factory=dict)
    bad: int = 0
    drops: int = 0
    used_s: float = 0.0
    train_s: float = 0.0
    stop_reason: str | None = None
    loss_curve: list[list[float]] = field(default_factory=list)
    val_curve: list[dict[str, float | None]] = field(default_factory=list)
    acc: list[float] = field(default_factory=list)

    def info(self) -> dict[str, Any]:
        return {"lr_factor": self.lr_factor, "best_psnr": self.best_psnr, "best_step": self.best_step,
                "best_scores": self.best_scores, "bad": self.bad, "drops": self.drops, "wall_s": self.used_s,
                "train_s": self.train_s, "stop_reason": self.stop_reason, "loss_curve": self.loss_curve,
                "val_curve": self.val_curve, "loss_acc": self.acc}

    def restore(self, meta: dict[str, Any]) -> None:
        self.step = int(meta["step"])
        self.lr_factor = float(meta.get("lr_factor", 1.0))
        self.best_psnr = float(meta.get("best_psnr", -math.inf))
        self.best_step = int(meta.get("best_step", 0))
        self.best_scores = dict(meta.get("best_scores", {}))
        self.bad, self.drops = int(meta.get("bad", 0)), int(meta.get("drops", 0))
        self.used_s, self.train_s = float(meta.get("wall_s", 0.0)), float(meta.get("train_s", 0.0))
        self.stop_reason = meta.get("stop_reason")
        self.loss_curve, self.val_curve = meta.get("loss_curve", []), meta.get("val_curve", [])
        self.acc = [float(v) for v in meta.get("loss_acc", [])]

    def networks(self) -> dict[str, nn.Module]:
        return {**self.sur.networks(), "best": self.best, **({"avg": self.avg} if self.avg is not None else {})}

    @property
    def judged(self) -> nn.Module:
        """The weights that are validated and kept as the best: the moving average when there is one."""
        return self.avg if self.avg is not None else self.sur.G

    @torch.no_grad()
    def update_average(self, decay: float) -> None:
        """``avg <- d * avg + (1 - d) * G`` with ``d = min(decay, (1 + step) / (10 + step))`` (buffers copied)."""
        if self.avg is None:
            return
        d = min(decay, (1.0 + self.step) / (10.0 + self.step))
        for a, g in zip(self.avg.parameters(), self.sur.G.parameters(), strict=True):
            a.lerp_(g.detach(), 1.0 - d)
        for a, g in zip(self.avg.buffers(), self.sur.G.buffers(), strict=True):
            a.copy_(g)


LR_DROP = 3.0  # learning-rate divisor on a plateau


def _new_loop(kind_name: str, cfg: TrainConfig, scale: int, task: str, device: torch.device,
              min_side: int) -> _Loop:
    kind = get_surrogate(kind_name)
    profile = _resolve_profile(kind, cfg)
    torch.manual_seed(cfg.seed)
    sur = kind(scale, task, profile, device, amp=cfg.amp)
    mult = sur.patch_multiple()
    patch = min(sur.input_patch(profile.patch), min_side)
    patch -= patch % mult
    if patch < mult:
        raise TrainingError(f"training inputs are {min_side}px at the smallest; the {kind_name} {cfg.profile} "
                            f"surrogate needs crops of at least {mult}px: lower its depth (arch_kwargs) or "
                            "harvest larger crops")
    avg = copy.deepcopy(sur.G) if cfg.ema > 0 else None
    return _Loop(kind_name, sur, patch, copy.deepcopy(sur.G), avg, lr=profile.lr)


def surrogate_min_side(cfg: TrainConfig, scale: int, task: str) -> int:
    """The smallest training-input side (input pixels) the surrogate of ``cfg`` (every candidate of ``auto``)
    trains on at ``scale``: its crops must be a multiple of this (a U-Net of depth d: ``2**d``). Raises
    :class:`ConfigError` for an unknown kind, profile or option, or a ``patch`` below that side."""
    names = auto_candidates(task, scale) if cfg.arch == "auto" else [cfg.arch]
    need = 1
    for name in names:
        kind = get_surrogate(name)
        try:
            sur = kind(scale, task, _resolve_profile(kind, cfg), torch.device("cpu"), amp=False)
        except ConfigError:
            if len(names) == 1:
                raise
            continue  # auto skips a kind that does not fit the task, as training does
        mult = sur.patch_multiple()
        if sur.input_patch(sur.profile.patch) < mult:
            raise ConfigError(f"training crops of {sur.input_patch(sur.profile.patch)}px are below the {name} "
                              f"{cfg.profile} surrogate's minimum of {mult}px: raise --patch")
        need = max(need, mult)
    return need


def _observe(loop: _Loop, split: Split, cfg: TrainConfig) -> None:
    """Validate, keep the best weights, and apply the plateau rule (see :class:`TrainConfig`)."""
    val = _validate(loop.judged, loop.sur.device, split)
    loop.val_curve.append({"step": loop.step, **val, "lr": loop.lr})
    if val["psnr"] > loop.best_psnr + cfg.min_delta_db:
        loop.best_psnr, loop.best_step, loop.best_scores, loop.bad = val["psnr"], loop.step, val, 0
        loop.best.load_state_dict(loop.judged.state_dict())
        return
    loop.bad += 1
    if loop.bad >= cfg.patience and loop.step - loop.best_step >= cfg.plateau_fraction * loop.step:
        if loop.drops >= cfg.lr_drops:
            loop.stop_reason = "plateau"
        else:
            loop.drops, loop.bad = loop.drops + 1, 0
            loop.lr_factor /= LR_DROP


def _to_unit(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 ``(B, 3, h, w)`` -> float32 in [0, 1] on ``device``, channels-last, in one copy."""
    return batch.to(device, torch.float32, non_blocking=True, memory_format=torch.channels_last).div_(255.0)


def lr_factor(loop: _Loop, cfg: TrainConfig, horizon_steps: int, horizon_s: float | None) -> float:
    """Learning-rate multiplier of the next step: the plateau factor, times a half cosine from 1 to
    ``cfg.lr_floor`` over the run (``schedule = "cosine"``; Loshchilov & Hutter 2017 without restarts).

    The run's progress is the larger of ``step / horizon_steps`` and ``used_s / horizon_s``, so under a
    time budget the rate reaches its floor when the time runs out, whatever the machine's speed.
    """
    if cfg.schedule == "plateau":
        return loop.lr_factor
    frac = loop.step / max(1, horizon_steps)
    if horizon_s is not None and horizon_s > 0:
        frac = max(frac, loop.used_s / horizon_s)
    frac = min(1.0, frac)
    return loop.lr_factor * (cfg.lr_floor + (1.0 - cfg.lr_floor) * 0.5 * (1.0 + math.cos(math.pi * frac)))


def _run_loop(loop: _Loop, split: Split, cfg: TrainConfig, *, max_steps: int, until_s: float | None,
              val_every: int, ckpt: Callable[[], None] | None = None, ckpt_every: int = 0,
              progress: ProgressHook = NO_PROGRESS, label: str = "train",
              horizon: tuple[int, float | None] | None = None) -> None:
    """Train ``loop`` until ``max_steps``, ``until_s`` seconds of its wall time, or a plateau.

    Validates at step 0 (so the trivial start of ``resunet`` is the first "best") and every
    ``val_every`` steps; ``ckpt`` saves resumable state every ``ckpt_every`` steps and at the end.
    ``horizon`` is ``(steps, seconds)`` of the whole run for the learning-rate schedule (:func:`lr_factor`;
    an ``auto`` trial is the start of a longer run); default ``(max_steps, until_s)``.
    """
    horizon_steps, horizon_s = horizon or (max_steps, until_s)
    sur, device = loop.sur, loop.sur.device
    profile = sur.profile
    t0 = time.monotonic()
    used0 = loop.used_s
    if not loop.val_curve:
        _observe(loop, split, cfg)
    loader = DataLoader(BatchSource(split.train, loop.patch, profile.batch, cfg.seed, loop.step, max_steps,
                                    cfg.augment, cfg.align),
                        batch_size=None, shuffle=False, num_workers=cfg.workers, pin_memory=device.type == "cuda")
    progress.start(label, max_steps, loop.step)
    sur.train()
    try:
        for xb, yb in loader:
            if loop.stop_reason is not None:
                break
            if until_s is not None and loop.used_s >= until_s:
                loop.stop_reason = "time"
                break
            ts = time.monotonic()
            x, y = _to_unit(xb, device), _to_unit(yb, device)
            loop.lr = sur.set_lr(lr_factor(loop, cfg, horizon_steps, horizon_s))
            losses = sur.train_step(x, y)
            loop.step += 1
            loop.update_average(cfg.ema)
            loop.train_s += time.monotonic() - ts
            loop.acc.append(losses["loss"])
            if loop.step % cfg.log_every == 0 or loop.step == max_steps:
                loop.loss_curve.append([loop.step, sum(loop.acc) / len(loop.acc)])
                loop.acc = []
            if loop.step % val_every == 0 or loop.step == max_steps:
                _observe(loop, split, cfg)
            loop.used_s = used0 + time.monotonic() - t0
            if ckpt is not None and loop.step % ckpt_every == 0:
                ckpt()
            progress.advance(label, 1, f"loss {losses['loss']:.4g} · best {loop.best_psnr:.2f} dB")
    finally:
        progress.finish(label)
    if loop.stop_reason is None:
        loop.stop_reason = "steps" if loop.step >= max_steps else "time"
    if loop.val_curve[-1]["step"] != loop.step:
        _observe(loop, split, cfg)
    loop.used_s = used0 + time.monotonic() - t0
    if ckpt is not None:
        ckpt()


def _choose_auto(candidates: list[str], cfg: TrainConfig, split: Split, scale: int, task: str,
                 device: torch.device, min_side: int,
                 progress: ProgressHook) -> tuple[_Loop, dict[str, Any], _Loop | None]:
    """Train each candidate briefly on the same batches; keep the best on held-out pairs.

    Each trial gets ``auto_trial`` of the time budget (or of the profile's steps without one). The first
    candidate that fits is the default: another replaces it only when its trial beats the default's by more
    than ``cfg.auto_margin_db`` (ties and near-ties keep the default). The winner continues from where its
    trial stopped. Returns ``(winner, auto.json record, default)``, ``default`` None when it is the winner
    (the caller falls back to it if the winner ends below it).
    """
    trials: dict[str, float] = {}
    best: _Loop | None = None
    default: _Loop | None = None
    others_s = 0.0
    for name in candidates:
        try:
            loop = _new_loop(name, cfg, scale, task, device, min_side)
        except (ConfigError, TrainingError) as exc:
            log.info("auto: skipping %s (%s)", name, exc)
            continue
        steps = loop.sur.profile.steps
        until = cfg.time_budget * cfg.auto_trial if cfg.time_budget is not None else None
        trial_steps = max(1, round(steps * cfg.auto_trial))
        whole = None if cfg.time_budget is None else cfg.time_budget * (1 - cfg.auto_trial * (len(candidates) - 1))
        _run_loop(loop, split, cfg, max_steps=trial_steps, until_s=until,
                  val_every=max(1, min(cfg.val_every or 50, trial_steps)), progress=progress, label=f"try {name}",
                  horizon=(steps, whole))
        trials[name] = round(loop.best_psnr, 3)
        log.info("auto: %s reached %.2f dB on held-out pairs in %d steps", name, loop.best_psnr, loop.step)
        if best is None or default is None:
            best = default = loop
        elif loop.best_psnr > best.best_psnr + (cfg.auto_margin_db if best is default else 0.0):
            best = loop
        others_s += loop.used_s
    if best is None:
        raise TrainingError(f"no surrogate among {', '.join(candidates)} fits these pairs")
    best.stop_reason = None
    best.bad = 0
    others_s -= best.used_s
    record = {"candidates": candidates, "trial_psnr": trials, "chosen": best.kind, "others_s": others_s,
              "margin_db": cfg.auto_margin_db}
    return best, record, (default if default is not best else None)


def _start(candidates: list[str], cfg: TrainConfig, split: Split, scale: int, task: str, device: torch.device,
           min_side: int, state_dir: Path, auto_path: Path, progress: ProgressHook,
           ) -> tuple[_Loop, dict[str, Any] | None, _Loop | None, bool]:
    """The loop to train: ``(loop, auto record or None, auto's default-kind trial or None, resuming)``.

    One candidate: its loop. Several (``--arch auto``): the kind ``auto.json`` chose when resuming, else
    every candidate tried briefly (:func:`_choose_auto`) and the choice written to ``auto_path``."""
    if cfg.restart:
        auto_path.unlink(missing_ok=True)
    resuming = (state_dir / "state.json").exists() and not cfg.restart
    prior = read_json(auto_path) if cfg.arch == "auto" else None
    if len(candidates) == 1:
        return _new_loop(candidates[0], cfg, scale, task, device, min_side), None, None, resuming
    if resuming and prior and prior.get("chosen") in candidates:
        return _new_loop(str(prior["chosen"]), cfg, scale, task, device, min_side), prior, None, True
    loop, auto, default = _choose_auto(candidates, cfg, split, scale, task, device, min_side, progress)
    atomic_write_json(auto_path, auto)
    return loop, auto, default, False


def train_surrogate(
    pairs: str | Path,
    out: str | Path | None = None,
    config: TrainConfig | None = None,
    *,
    progress: ProgressHook | None = None,
    advice: str = DEFAULT_ADVICE,
    **options: Any,
) -> TrainResult:
    """Train a surrogate on the pairs of a run folder and save it in the Foundation checkpoint format.

    Args:
        pairs: a run folder (``RUN`` holding ``pairs/manifest.jsonl``) or a pairs folder.
        out: output folder; default ``RUN/surrogate``. Holds ``model.safetensors`` + ``model.json`` and
            ``train_state/`` (resumed automatically unless ``restart``); with ``arch="auto"`` also
            ``auto.json`` (the candidates' trial scores and the choice, so a resume does not re-try).
        config: a :class:`TrainConfig`; or pass its fields as keyword ``options``.
        progress: optional :class:`ProgressHook`.
        advice: what the baseline ``warning`` advises, in the caller's terms (its options).

    Training stops at the first of: ``steps`` (the profile's cap), ``time_budget`` seconds, or a
    plateau of held-out PSNR; the checkpoint holds the *best* held-out weights. Returns a
    :class:`TrainResult`; also writes the ``train`` section of ``RUN/run.json`` when the pairs belong to
    a run folder, with ``beats_baseline`` and a ``warning`` when the surrogate is no better than the
    trivial baseline on held-out pairs.
    """
    try:
        cfg = config or TrainConfig(**options)
    except ValidationError as exc:
        raise ConfigError(f"bad training option {first_problem(exc)}") from None
    progress = progress or NO_PROGRESS
    counter = build_counter(cfg.counter)  # a bad spec fails before any pair is read
    pairs_dir, run_dir = resolve_pairs_dir(pairs)
    out_dir = check_out_folder(Path(out) if out is not None else (run_dir or pairs_dir.parent) / "surrogate")
    _check_surrogate_folder(out_dir, pairs_dir)
    target = read_run(run_dir).get("target", {}) if run_dir else {}
    info = target.get("info", {})
    with folder_lock(run_dir, shared=True) if run_dir is not None else contextlib.nullcontext():
        ps = load_pairs(pairs_dir)  # not while a harvest is adding pairs to it
    counter.fit(ps.outputs)
    ps = PairSet(ps.ids, ps.inputs, counter.apply_uint8(ps.outputs), ps.scale, ps.sources)
    task = str(info.get("task", "translation"))
    if info.get("scale") not in (None, ps.scale):
        log.warning("victim reports scale %s but the pairs show %d; using %d", info.get("scale"), ps.scale, ps.scale)
    candidates = auto_candidates(task, ps.scale) if cfg.arch == "auto" else [cfg.arch]
    for name in candidates:
        _resolve_profile(get_surrogate(name), cfg)  # unknown kinds / profiles / options fail before any work
    try:
        device = pick_device(cfg.device)
    except RuntimeError as exc:
        raise ConfigError(str(exc)) from None
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    # the split must leave crops every candidate can train on
    mult = 1
    for name in candidates:
        k = get_surrogate(name)
        with contextlib.suppress(ConfigError):
            mult = max(mult, k(ps.scale, task, _resolve_profile(k, cfg), torch.device("cpu"), amp=False)
                       .patch_multiple())
    split = split_pairs(ps, cfg, min_train_side=mult)
    min_side = min(min(x.shape[-2:]) for x in split.train.inputs)
    state_dir = out_dir / "train_state"
    auto_path = out_dir / "auto.json"
    with folder_lock(out_dir, "surrogate folder"):
        t0 = time.monotonic()
        base_scores = _baseline_scores(split, ps.scale)
        loop, auto, default, resuming = _start(candidates, cfg, split, ps.scale, task, device, min_side,
                                               state_dir, auto_path, progress)
        sur, profile, kind_name = loop.sur, loop.sur.profile, loop.kind
        steps = profile.steps
        val_every = cfg.val_every or max(1, min(50, steps // 10))
        ckpt_every = cfg.checkpoint_every or max(1, min(200, steps // 10))
        fp = fingerprint({"kind": kind_name, "profile": profile.model_dump(exclude={"steps"}), "scale": ps.scale,
                          "pairs": hashlib.sha256(",".join(ps.ids).encode()).hexdigest(), "patch": loop.patch,
                          "val": split.val_ids, "seed": cfg.seed, "augment": cfg.augment, "align": cfg.align}
                         | ({"counter": counter.spec.describe()} if counter.spec.kind != "none" else {}))
        if resuming:
            meta = load_state(state_dir, loop.networks(), sur.optimizers(), sur.scaler)
            if meta.get("fingerprint") != fp:
                raise TrainingError(f"{state_dir}: holds training with different settings or pairs; pass "
                                    "--restart to start over (or use another --out)")
            loop.restore(meta)
            if loop.stop_reason == "plateau":  # finished: held-out fidelity had stopped improving; nothing to add
                log.info("training already stopped on a plateau at step %d; keeping it", loop.step)
            else:  # interrupted, or stopped on time or steps (a larger budget goes on)
                loop.stop_reason = None
                log.info("resuming training at step %d of at most %d", loop.step, steps)

        def ckpt() -> None:
            save_state(state_dir, loop.step, loop.networks(), sur.optimizers(), sur.scaler,
                       {"fingerprint": fp, **loop.info()})

        until = None if cfg.time_budget is None else cfg.time_budget - float((auto or {}).get("others_s", 0.0))
        _run_loop(loop, split, cfg, max_steps=steps, until_s=until, val_every=val_every, ckpt=ckpt,
                  ckpt_every=ckpt_every, progress=progress)
        if default is not None and auto is not None and default.best_psnr > loop.best_psnr:
            log.warning("auto: %s ended at %.2f dB on held-out pairs, below the %s trial (%.2f dB); keeping %s",
                        loop.kind, loop.best_psnr, default.kind, default.best_psnr, default.kind)
            auto = {**auto, "chosen": default.kind, "fallback_from": loop.kind,
                    "fallback_psnr": round(loop.best_psnr, 3)}
            atomic_write_json(auto_path, auto)
            shutil.rmtree(state_dir, ignore_errors=True)  # held the abandoned kind's state
            loop = default
            sur, profile, kind_name = loop.sur, loop.sur.profile, loop.kind
            steps = profile.steps
        fidelity = loop.best_scores
        ips = (loop.step * profile.batch / loop.train_s) if loop.train_s > 0 else 0.0
        g = loop.best.eval()
        name = "bicubic" if ps.scale > 1 else "identity"
        margin = fidelity["psnr"] - base_scores["psnr"]
        beats = margin > 0.0
        warning = None if beats else (
            f"the surrogate is NOT better than the trivial {name} baseline on {scored_on(split.held_out)} "
            f"({fidelity['psnr']:.2f} dB vs {base_scores['psnr']:.2f} dB): {advice}")
        if warning:
            log.warning("%s", warning)
        summary: dict[str, Any] = {
            "kind": kind_name, "arch": sur.arch, "profile": cfg.profile, "steps": loop.step, "max_steps": steps,
            "best_step": loop.best_step, "stop_reason": loop.stop_reason, "time_budget_s": cfg.time_budget,
            "batch": profile.batch, "patch": loop.patch, "align": cfg.align, "augment": cfg.augment,
            "lr": profile.lr, "lr_factor": loop.lr_factor, "seed": cfg.seed, "device": str(device), "amp": sur.amp,
            "ema": cfg.ema,
            "amp_dtype": str(sur.amp_dtype).removeprefix("torch.") if sur.amp_dtype else None,
            "counter": counter.spec.describe(),
            "counter_amplitude": counter.amplitude, "pairs_train": len(split.train),
            "pairs_val": len(split.val_ids), "held_out": split.held_out, "loss_curve": loop.loss_curve,
            "val_curve": loop.val_curve, "fidelity": fidelity, "baseline": base_scores, "baseline_name": name,
            "gain_db": margin, "beats_baseline": beats, "warning": warning, "auto": auto,
            "wall_s": time.monotonic() - t0, "train_s": loop.train_s, "images_per_s": ips,
        }
        card = ModelCard(
            name=f"surrogate-{target.get('model', 'victim')}-{kind_name}", arch=sur.arch, kwargs=sur.arch_kwargs,
            task=task, scale=ps.scale, size_multiple=int(getattr(g, "size_multiple", 1) or 1),
            min_side=max(4, int(getattr(g, "size_multiple", 1) or 1)),
            description=f"{kind_name} surrogate trained by heist attack on {len(ps)} harvested pairs",
            training={k: v for k, v in summary.items() if k not in ("loss_curve", "val_curve")}
            | {"victim_url": target.get("url"), "victim_model": target.get("model")},
            metrics={"held_out_vs_victim": fidelity, "baseline_vs_victim": base_scores},
        )
        ckpt_path = save_checkpoint(g, out_dir / "model.safetensors", card)
    run_json = None
    if run_dir is not None:
        rel = ckpt_path.relative_to(run_dir) if ckpt_path.is_relative_to(run_dir) else ckpt_path
        update_run(run_dir, train=summary | {"checkpoint": str(rel)})
        run_json = run_dir / "run.json"
    return TrainResult(ckpt_path, card, fidelity, base_scores, split.held_out, loop.step, loop.loss_curve,
                       loop.val_curve, summary["wall_s"], ips, summary, run_json)
