"""Surrogate training on harvested pairs: data, held-out split, resumable loop, fidelity, checkpoint.

Pairs are held in memory as uint8. Each step's batch is a pure function of ``(seed, step)``: random
aligned crops (``patch`` input pixels, ``scale * patch`` output pixels) from pairs chosen with
probability proportional to their number of crop positions, each under one of the 8 dihedral
transforms. So a resumed run sees exactly the batches an uninterrupted one would, with or without
DataLoader workers, and on CPU ends with bit-identical weights.

Held-out pairs (never trained on) measure fidelity: ``max(1, round(val_fraction * N))`` pairs (at most
``max_val_pairs``) chosen by seed; with a single pair, a stripe of it along the longer side (a quarter)
is held out instead, as the single-example paper tests on unseen regions. Learning rate: cosine decay
from ``lr`` to ``lr / 10``.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch.utils.data import DataLoader, Dataset

from attacker.countermeasures import build_counter
from attacker.errors import ConfigError, TrainingError
from attacker.fidelity import baseline, psnr_ssim_l2, translate
from attacker.files import folder_lock
from attacker.pairstore import MANIFEST, PairStore
from attacker.progress import NO_PROGRESS, ProgressHook
from attacker.runinfo import read_run, update_run
from attacker.surrogates import Surrogate, SurrogateProfile, auto_kind, get_surrogate
from attacker.trainstate import fingerprint, load_state, save_state
from translators.checkpoint import ModelCard, save_checkpoint
from translators.device import pick_device

log = logging.getLogger(__name__)
ArchValue = int | float | bool | str


class TrainConfig(BaseModel):
    """Options of :func:`train_surrogate`. ``None`` fields take the profile's value.

    Attributes:
        arch: surrogate kind (``pix2pix``, ``srresnet``, ``unet-l2``) or ``auto`` (SR: srresnet,
            denoise: unet-l2, else pix2pix).
        profile: ``tiny`` (tests), ``small`` (CPU), ``default``, ``full`` (GPU).
        patch: training crop side in input pixels (clamped to the smallest training input).
        arch_kwargs: overrides of the profile's generator kwargs (e.g. ``{"depth": 3}``).
        workers: DataLoader worker processes (0 = build batches in the training process).
        threads: ``torch.set_num_threads`` for this process (None = torch's default). On a loaded
            machine fewer threads than cores can be many times faster (OpenMP threads spin-wait).
        val_max_side: held-out pairs are centre-cropped to this many input pixels a side.
        counter: counter-measure spec applied to every harvested output before training
            (:mod:`attacker.countermeasures`, e.g. ``lowpass:sigma=1.5``, ``aware``).
    """

    model_config = ConfigDict(extra="forbid")

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
    augment: bool = True
    val_fraction: float = Field(0.1, ge=0, lt=1)
    max_val_pairs: int = Field(32, ge=1)
    val_max_side: int = Field(128, ge=8)
    val_every: int | None = Field(None, ge=1)
    checkpoint_every: int | None = Field(None, ge=1)
    log_every: int = Field(10, ge=1)
    restart: bool = False
    counter: str = "none"


@dataclass
class PairSet:
    """Pairs in memory: ``inputs[i]`` ``(3, h, w)`` uint8, ``outputs[i]`` ``(3, s*h, s*w)`` uint8."""

    ids: list[str]
    inputs: list[torch.Tensor]
    outputs: list[torch.Tensor]
    scale: int

    def __len__(self) -> int:
        return len(self.ids)


def _u8(x: torch.Tensor) -> torch.Tensor:
    return x[0].mul(255.0).round().clamp(0, 255).to(torch.uint8)


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
    ids, ins, outs, scales = [], [], [], []
    for rec in recs:
        x, y = store.load_pair(rec)
        ids.append(rec.id)
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
    return PairSet([ids[i] for i in keep], [ins[i] for i in keep], [outs[i] for i in keep], scale)


@dataclass
class Split:
    train: PairSet
    val_inputs: list[torch.Tensor]  # (1, 3, h, w) float
    val_targets: list[torch.Tensor]
    held_out: Literal["pairs", "region", "none"]
    val_ids: list[str] = field(default_factory=list)


def _center_crop_pair(x: torch.Tensor, y: torch.Tensor, side: int, scale: int) -> tuple[torch.Tensor, torch.Tensor]:
    h, w = x.shape[-2:]
    ch, cw = min(h, side), min(w, side)
    t, le = (h - ch) // 2, (w - cw) // 2
    return (x[..., t : t + ch, le : le + cw],
            y[..., t * scale : (t + ch) * scale, le * scale : (le + cw) * scale])


def split_pairs(ps: PairSet, cfg: TrainConfig, min_train_side: int) -> Split:
    """Hold out pairs (or, with one pair, a stripe of it) for validation; see module docstring."""
    s = ps.scale

    def f(t: torch.Tensor) -> torch.Tensor:
        return t.unsqueeze(0).float().div(255.0)

    def val_of(xs: list[torch.Tensor], ys: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        vx, vy = [], []
        for x, y in zip(xs, ys):
            cx, cy = _center_crop_pair(f(x), f(y), cfg.val_max_side, s)
            vx.append(cx)
            vy.append(cy)
        return vx, vy

    n = len(ps)
    if n >= 2 and cfg.val_fraction > 0:
        n_val = min(cfg.max_val_pairs, max(1, round(cfg.val_fraction * n)), n - 1)
        order = sorted(range(n), key=lambda i: ps.ids[i])
        random.Random(f"heist:val:{cfg.seed}").shuffle(order)
        val = sorted(order[:n_val])
        tr = sorted(order[n_val:])
        vx, vy = val_of([ps.inputs[i] for i in val], [ps.outputs[i] for i in val])
        train = PairSet([ps.ids[i] for i in tr], [ps.inputs[i] for i in tr], [ps.outputs[i] for i in tr], s)
        return Split(train, vx, vy, "pairs", [ps.ids[i] for i in val])
    if n == 1 and cfg.val_fraction > 0:
        x, y = ps.inputs[0], ps.outputs[0]
        h, w = x.shape[-2:]
        along_w = w >= h
        long_side = w if along_w else h
        v = max(8, long_side // 4)
        if long_side - v >= min_train_side:
            cut = long_side - v
            if along_w:
                tx, ty, vx_, vy_ = x[..., :cut], y[..., : cut * s], x[..., cut:], y[..., cut * s :]
            else:
                tx, ty, vx_, vy_ = x[..., :cut, :], y[..., : cut * s, :], x[..., cut:, :], y[..., cut * s :, :]
            vx, vy = val_of([vx_.contiguous()], [vy_.contiguous()])
            return Split(PairSet(ps.ids, [tx.contiguous()], [ty.contiguous()], s), vx, vy, "region", ps.ids)
    vx, vy = val_of(ps.inputs, ps.outputs)
    return Split(ps, vx, vy, "none", [])


class BatchSource(Dataset):
    """Item ``k`` is the batch of step ``start + k``: ``(B, 3, p, p)`` and ``(B, 3, s*p, s*p)`` uint8."""

    def __init__(self, ps: PairSet, patch: int, batch: int, seed: int, start: int, stop: int, augment: bool) -> None:
        self.ps, self.patch, self.batch, self.seed = ps, patch, batch, seed
        self.start, self.stop, self.augment = start, stop, augment
        self.weights = [(x.shape[-2] - patch + 1) * (x.shape[-1] - patch + 1) for x in ps.inputs]

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
            t = rng.randint(0, x.shape[-2] - p)
            le = rng.randint(0, x.shape[-1] - p)
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
    fidelity: dict[str, float]
    baseline: dict[str, float]
    held_out: str
    steps: int
    loss_curve: list[list[float]]
    val_curve: list[dict[str, float]]
    wall_s: float
    images_per_s: float
    summary: dict[str, Any]
    run_json: Path | None = None


def _cosine(step: int, total: int) -> float:
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(step, total) / max(total, 1)))


@torch.no_grad()
def _validate(sur: Surrogate, split: Split) -> dict[str, float]:
    g = sur.G
    was = g.training
    g.eval()
    scores = [psnr_ssim_l2(translate(g, x, sur.device), y) for x, y in zip(split.val_inputs, split.val_targets)]
    g.train(was)
    return {k: float(sum(sc[k] for sc in scores) / len(scores)) for k in scores[0]}


def _baseline_scores(split: Split, scale: int) -> dict[str, float]:
    scores = [psnr_ssim_l2(baseline(x, scale), y) for x, y in zip(split.val_inputs, split.val_targets)]
    return {k: float(sum(sc[k] for sc in scores) / len(scores)) for k in scores[0]}


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


def train_surrogate(
    pairs: str | Path,
    out: str | Path | None = None,
    config: TrainConfig | None = None,
    *,
    progress: ProgressHook | None = None,
    **options: Any,
) -> TrainResult:
    """Train a surrogate on the pairs of a run folder and save it in the Foundation checkpoint format.

    Args:
        pairs: a run folder (``RUN`` holding ``pairs/manifest.jsonl``) or a pairs folder.
        out: output folder; default ``RUN/surrogate``. Holds ``model.safetensors`` + ``model.json`` and
            ``train_state/`` (resumed automatically unless ``restart``).
        config: a :class:`TrainConfig`; or pass its fields as keyword ``options``.
        progress: optional :class:`ProgressHook`.

    Returns a :class:`TrainResult`; also writes the ``train`` section of ``RUN/run.json`` when the pairs
    belong to a run folder.
    """
    try:
        cfg = config or TrainConfig(**options)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise ConfigError(f"bad training option {'.'.join(map(str, first['loc']))}: {first['msg']}") from None
    progress = progress or NO_PROGRESS
    counter = build_counter(cfg.counter)  # a bad spec fails before any pair is read
    pairs_dir, run_dir = resolve_pairs_dir(pairs)
    out_dir = Path(out) if out is not None else (run_dir or pairs_dir.parent) / "surrogate"
    target = read_run(run_dir).get("target", {}) if run_dir else {}
    info = target.get("info", {})
    ps = load_pairs(pairs_dir)
    counter.fit(ps.outputs)
    ps = PairSet(ps.ids, ps.inputs, counter.apply_uint8(ps.outputs), ps.scale)
    task = str(info.get("task", "translation"))
    if info.get("scale") not in (None, ps.scale):
        log.warning("victim reports scale %s but the pairs show %d; using %d", info.get("scale"), ps.scale, ps.scale)
    kind_name = auto_kind(task, ps.scale) if cfg.arch == "auto" else cfg.arch
    kind = get_surrogate(kind_name)
    profile = _resolve_profile(kind, cfg)
    try:
        device = pick_device(cfg.device)
    except RuntimeError as exc:
        raise ConfigError(str(exc)) from None
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    sur = kind(ps.scale, task, profile, device, amp=cfg.amp)
    mult = sur.patch_multiple()
    split = split_pairs(ps, cfg, min_train_side=mult)
    min_side = min(min(x.shape[-2:]) for x in split.train.inputs)
    patch = min(profile.patch, min_side)
    patch -= patch % mult
    if patch < mult:
        raise TrainingError(f"training inputs are {min_side}px at the smallest; the {kind_name} {cfg.profile} "
                            f"surrogate needs crops of at least {mult}px: lower its depth (arch_kwargs) or "
                            "harvest larger crops")
    steps = profile.steps
    val_every = cfg.val_every or max(1, steps // 10)
    ckpt_every = cfg.checkpoint_every or max(1, steps // 10)
    fp = fingerprint({"kind": kind_name, "profile": profile.model_dump(exclude={"steps"}), "scale": ps.scale,
                      "pairs": hashlib.sha256(",".join(ps.ids).encode()).hexdigest(), "patch": patch,
                      "val": split.val_ids, "seed": cfg.seed, "augment": cfg.augment}
                     | ({"counter": counter.spec.describe()} if counter.spec.kind != "none" else {}))
    state_dir = out_dir / "train_state"
    with folder_lock(out_dir, "surrogate folder"):
        start, loss_curve, val_curve, prior_s, prior_train_s = 0, [], [], 0.0, 0.0
        acc: list[float] = []  # losses since the last loss-curve point
        if (state_dir / "state.json").exists() and not cfg.restart:
            meta = load_state(state_dir, sur.networks(), sur.optimizers(), sur.scaler)
            if meta.get("fingerprint") != fp:
                raise TrainingError(f"{state_dir}: holds training with different settings or pairs; pass "
                                    "--restart to start over (or use another --out)")
            start = int(meta["step"])
            loss_curve, val_curve = meta.get("loss_curve", []), meta.get("val_curve", [])
            acc = [float(v) for v in meta.get("loss_acc", [])]
            prior_s, prior_train_s = float(meta.get("wall_s", 0.0)), float(meta.get("train_s", 0.0))
            log.info("resuming training at step %d of %d", start, steps)
        base_scores = _baseline_scores(split, ps.scale)
        t0 = time.monotonic()
        train_s = 0.0

        def state_info() -> dict[str, Any]:
            return {"fingerprint": fp, "loss_curve": loss_curve, "val_curve": val_curve, "loss_acc": acc,
                    "wall_s": prior_s + time.monotonic() - t0, "train_s": prior_train_s + train_s}

        loader = DataLoader(BatchSource(split.train, patch, profile.batch, cfg.seed, start, steps, cfg.augment),
                            batch_size=None, shuffle=False, num_workers=cfg.workers,
                            pin_memory=device.type == "cuda")
        progress.start("train", steps, start)
        sur.train()
        step = start
        try:
            for xb, yb in loader:
                ts = time.monotonic()
                x = xb.to(device, non_blocking=True).float().div_(255.0)
                y = yb.to(device, non_blocking=True).float().div_(255.0)
                sur.set_lr(_cosine(step, steps))
                losses = sur.train_step(x, y)
                train_s += time.monotonic() - ts
                step += 1
                acc.append(losses["loss"])
                if step % cfg.log_every == 0 or step == steps:
                    loss_curve.append([step, sum(acc) / len(acc)])
                    acc = []
                if step % val_every == 0 or step == steps:
                    val = _validate(sur, split)
                    val_curve.append({"step": step, **val})
                if step % ckpt_every == 0 or step == steps:
                    save_state(state_dir, step, sur.networks(), sur.optimizers(), sur.scaler, state_info())
                last = val_curve[-1] if val_curve else None
                progress.advance("train", 1, f"loss {losses['loss']:.4g}" +
                                 (f" · val {last['psnr']:.2f} dB" if last else ""))
        finally:
            progress.finish("train")
        if step < steps:  # pragma: no cover - the loader always yields stop-start batches
            raise TrainingError("training stopped early")
        fidelity = _validate(sur, split) if not val_curve or val_curve[-1]["step"] != steps else {
            k: v for k, v in val_curve[-1].items() if k != "step"}
        total_train_s = prior_train_s + train_s
        ips = (steps * profile.batch / total_train_s) if total_train_s > 0 else 0.0
        wall = prior_s + time.monotonic() - t0
        g = sur.G.eval()
        summary: dict[str, Any] = {
            "kind": kind_name, "arch": sur.arch, "profile": cfg.profile, "steps": steps, "batch": profile.batch,
            "patch": patch, "lr": profile.lr, "seed": cfg.seed, "device": str(device),
            "amp": sur.amp, "counter": counter.spec.describe(), "counter_amplitude": counter.amplitude,
            "pairs_train": len(split.train), "pairs_val": len(split.val_ids),
            "held_out": split.held_out, "loss_curve": loss_curve, "val_curve": val_curve,
            "fidelity": fidelity, "baseline": base_scores,
            "baseline_name": "bicubic" if ps.scale > 1 else "identity", "wall_s": wall,
            "train_s": total_train_s, "images_per_s": ips,
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
        ckpt = save_checkpoint(g, out_dir / "model.safetensors", card)
    run_json = None
    if run_dir is not None:
        rel = ckpt.relative_to(run_dir) if ckpt.is_relative_to(run_dir) else ckpt
        update_run(run_dir, train=summary | {"checkpoint": str(rel)})
        run_json = run_dir / "run.json"
    return TrainResult(ckpt, card, fidelity, base_scores, split.held_out, steps, loss_curve, val_curve, wall, ips,
                       summary, run_json)
