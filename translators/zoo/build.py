"""Train and cache zoo victims.

``build(name, profile)`` trains the recipe on random crops of the corpus ``victim`` split, evaluates it
against ground truth on the ``benchmark`` split (PSNR/SSIM, :mod:`translators.psnr_ssim`, data_range 1, no
border crop, RGB, SSIM without downsampling) next to the recipe's trivial baseline, and writes
``zoo_dir()/PROFILE/NAME.safetensors`` + card.
A file lock makes concurrent builds of the same model (several server workers) train it once.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F

from translators.archs import build_arch, count_parameters
from translators.checkpoint import ModelCard, save_checkpoint
from translators.corpus import DEFAULT_SEED, PatchSampler, load_images
from translators.device import pick_device
from translators.images import center_crop
from translators.paths import zoo_dir
from translators.psnr_ssim import MetricSettings, psnr_scores, ssim_scores
from translators.zoo.recipes import PROFILES, Recipe, TrainSpec, get_recipe

log = logging.getLogger(__name__)
ProgressFn = Callable[[int, int, float], None]  # (step, total_steps, loss)


def zoo_checkpoint(name: str, profile: str = "tiny") -> Path:
    """Where the checkpoint of ``name`` at ``profile`` lives (it may not exist yet)."""
    get_recipe(name)
    _check_profile(profile)
    return zoo_dir() / profile / f"{name}.safetensors"


def _check_profile(profile: str) -> None:
    if profile not in PROFILES:
        from translators.errors import HeistError

        raise HeistError(f"unknown zoo profile {profile!r}; use {', '.join(PROFILES)}")


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _training_batch(recipe: Recipe, sampler: PatchSampler, spec: TrainSpec, step: int) -> tuple[torch.Tensor, ...]:
    clean = sampler.sample(spec.batch)
    return recipe.make_pair(clean, seed=step)


@torch.no_grad()
def evaluate_recipe_model(
    recipe: Recipe, model: torch.nn.Module, side: int, seed: int = DEFAULT_SEED, device: torch.device | None = None
) -> dict[str, float]:
    """PSNR/SSIM vs ground truth on centre crops (target side ``side``) of the benchmark split.

    Returns the model's mean PSNR (dB) and SSIM and the same for the recipe's trivial baseline.
    """
    settings = MetricSettings(data_range=1.0, crop_border=0, color_space="rgb", ssim_downsample=False)
    device = device or torch.device("cpu")
    images = load_images("corpus:benchmark", seed=seed)
    multiple = int(getattr(model, "size_multiple", 1))
    scores: dict[str, list[float]] = {"psnr": [], "ssim": [], "baseline_psnr": [], "baseline_ssim": []}
    model.eval()
    for i, im in enumerate(images):
        s = min(side, *im.image.shape[-2:])
        s -= s % (multiple * recipe.scale)
        inp, target = recipe.make_pair(center_crop(im.image, s), seed=10_000 + i, multiple=multiple)
        out = model(inp.to(device)).float().cpu().clamp(0, 1)
        base = recipe.baseline_output(inp)
        for prefix, pred in (("", out), ("baseline_", base)):
            scores[prefix + "psnr"].append(float(psnr_scores(pred, target, settings).mean()))
            scores[prefix + "ssim"].append(float(ssim_scores(pred, target, settings).mean()))
    return {k: round(sum(v) / len(v), 4) for k, v in scores.items()}


def train_recipe(
    recipe: Recipe,
    profile: str = "tiny",
    seed: int = 0,
    device: str | torch.device | None = None,
    on_step: ProgressFn | None = None,
) -> tuple[torch.nn.Module, dict[str, object]]:
    """Train ``recipe`` at ``profile`` from scratch; returns the model (on CPU, eval mode) and provenance."""
    _check_profile(profile)
    spec = recipe.specs[profile]
    dev = pick_device(str(device) if device else None)
    torch.manual_seed(seed)
    model = build_arch(recipe.arch, spec.arch_kwargs).to(dev)
    images = [im.image for im in load_images("corpus:victim", max_side=512)]
    sampler = recipe.training_sampler(images, spec, seed)
    opt = torch.optim.Adam(model.parameters(), lr=spec.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / spec.steps)))
    loss_fn = F.l1_loss if recipe.loss == "l1" else F.mse_loss
    t0 = time.perf_counter()
    model.train()
    ema = None
    for step in range(spec.steps):
        inp, target = _training_batch(recipe, sampler, spec, seed * 1_000_003 + step)
        out = model(inp.to(dev))
        loss = loss_fn(out, target.to(dev))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        lv = float(loss.detach())
        ema = lv if ema is None else 0.95 * ema + 0.05 * lv
        if on_step:
            on_step(step + 1, spec.steps, ema)
    train_s = time.perf_counter() - t0
    model.eval()
    provenance = {
        "data_split": "victim",
        "profile": profile,
        "steps": spec.steps,
        "batch": spec.batch,
        "patch": spec.patch,
        "lr": spec.lr,
        "loss": recipe.loss,
        "seed": seed,
        "device": str(dev),
        "train_seconds": round(train_s, 2),
        "final_loss_ema": round(ema or 0.0, 6),
        "parameters": count_parameters(model),
    }
    return model, provenance


def cached_checkpoint(name: str, profile: str = "tiny", seed: int = 0) -> Path | None:
    """The cached checkpoint of ``name`` at ``profile`` when it is complete (weights and card) and was
    trained with ``seed``; else None (then :func:`build` trains it). A kill between the two writes of
    :func:`save_checkpoint` leaves weights without a card: not cached."""
    path = zoo_checkpoint(name, profile)
    card = path.with_suffix(".json")
    if not (path.exists() and card.exists()):
        return None
    try:
        trained = json.loads(card.read_bytes()).get("training", {}).get("seed", 0)
    except (ValueError, AttributeError):
        return None
    return path if trained == seed else None


def build(
    name: str,
    profile: str = "tiny",
    seed: int = 0,
    force: bool = False,
    device: str | torch.device | None = None,
    on_step: ProgressFn | None = None,
) -> Path:
    """Train ``name`` at ``profile`` unless cached with ``seed`` (see :func:`cached_checkpoint`) or ``force``;
    return the ``.safetensors`` path."""
    recipe = get_recipe(name)
    path = zoo_checkpoint(name, profile)
    with _locked(path):
        if not force and cached_checkpoint(name, profile, seed) is not None:
            return path
        log.info("training zoo model %s (profile %s, seed %d)", name, profile, seed)
        model, provenance = train_recipe(recipe, profile, seed, device, on_step)
        model = model.cpu()
        spec = recipe.specs[profile]
        metrics = evaluate_recipe_model(recipe, model, spec.eval_side)
        metrics.update({"split": "benchmark", "baseline": recipe.baseline, "data_range": 1.0,
                        "crop_border": 0, "colour_space": "rgb", "eval_side": spec.eval_side})
        card = ModelCard(
            name=name,
            arch=recipe.arch,
            kwargs=spec.arch_kwargs,
            task=recipe.task,
            scale=recipe.scale,
            size_multiple=recipe.size_multiple(profile),
            min_side=max(8, recipe.size_multiple(profile)),
            description=recipe.description,
            training=provenance,
            metrics=metrics,
            **recipe.card_extras(profile, path, seed),
        )
        save_checkpoint(model, path, card)
        log.info("zoo model %s: PSNR %.2f dB (baseline %s %.2f dB)", name, metrics["psnr"], recipe.baseline,
                 metrics["baseline_psnr"])
        return path
