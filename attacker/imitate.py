"""Single-example imitation (Spingarn-Eliezer & Michaeli): one query, then an L2 U-Net on random crops.

The attacker sends one image, gets the victim's output, and trains a ``unet-l2`` surrogate on random
crops of that single pair (every output pixel is a training sample whose context is one receptive
field). Fidelity is measured on a held-out stripe of the pair (a quarter along its longer side), as
the paper tests on unseen regions; evaluating on other images costs more queries and is left to the
evaluator.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from attacker.client import ClientConfig, fetch_model_info
from attacker.errors import ConfigError, QuotaExhaustedError, RunFolderError
from attacker.files import check_out_folder
from attacker.harvest import HarvestResult, harvest
from attacker.progress import ProgressHook
from attacker.runinfo import read_run, update_run
from attacker.strategies import build_strategy
from attacker.surrogates import get_surrogate
from attacker.train import TrainConfig, TrainResult, surrogate_min_side, train_surrogate
from attacker.victim_info import ModelInfo
from translators.codecs import encode_image, read_image
from translators.corpus import NamedImage
from translators.errors import first_problem
from translators.images import quantize_8bit

log = logging.getLogger(__name__)
# what the baseline warning advises (`heist attack imitate`'s options)
ADVICE = "imitate from a larger or more varied image, or train longer (--steps, --time-budget)"


@dataclass
class ImitationResult:
    harvest: HarvestResult
    train: TrainResult
    sent_size: tuple[int, int] = (0, 0)  # (height, width) of the image actually sent
    warning: str | None = None  # set when the surrogate is no better than the trivial baseline

    @property
    def checkpoint(self) -> Path:
        return self.train.checkpoint

    @property
    def run_json(self) -> Path:
        return self.harvest.run_json


def add_gaussian_noise(x: torch.Tensor, sigma: float, seed: int = 0) -> torch.Tensor:
    """``x + N(0, (sigma/255)^2)``, clamped and quantised to 8 bits; ``x`` ``(1, 3, H, W)`` in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    return quantize_8bit(x + torch.randn(x.shape, generator=g) * (sigma / 255.0))


def _check_surrogate_fits(label: str, size: str, side: int, cfg: TrainConfig, info: ModelInfo) -> None:
    """One-line :class:`ConfigError` when a ``side`` px image is too small for the surrogate of ``cfg``,
    naming the profiles that would accept it."""
    need = surrogate_min_side(cfg, info.scale, info.task)
    if side >= need:
        return
    fits = []
    if cfg.arch != "auto":
        for p in get_surrogate(cfg.arch).profiles:
            if p != cfg.profile:
                with contextlib.suppress(ConfigError):
                    n = surrogate_min_side(cfg.model_copy(update={"profile": p}), info.scale, info.task)
                    if n <= side:
                        fits.append(f"--profile {p} accepts {n}")
    hint = f" ({', '.join(fits)})" if fits else "; use a larger image"
    raise ConfigError(f"{label} is {size}; imitation needs at least {need} px a side for the {cfg.profile} "
                      f"{cfg.arch} surrogate{hint}")


def imitate(
    url: str,
    api_keys: str | list[str],
    model: str,
    image: str | Path | torch.Tensor,
    out: str | Path,
    *,
    add_noise: float | None = None,
    arch: str = "unet-l2",
    profile: str = "small",
    steps: int | None = None,
    seed: int = 0,
    device: str = "auto",
    client: ClientConfig | dict[str, Any] | None = None,
    progress: ProgressHook | None = None,
    **train_options: Any,
) -> ImitationResult:
    """Imitate ``model`` from one example: query it once with ``image`` and train on that pair.

    Args:
        image: a file path or a ``(1, 3, H, W)`` tensor in [0, 1], sent as it is (PNG), at full size, unless
            it exceeds the model's ``max_pixels`` (then it is shrunk to fit, logged) or ``size_multiple``
            (cropped to it).
        add_noise: add Gaussian noise of this sigma (0..255 scale) first, e.g. to make a clean photo a
            sensible input for a denoiser.
        arch / profile / steps / seed / device and ``train_options``: passed to
            :func:`attacker.train.train_surrogate` (fields of :class:`~attacker.train.TrainConfig`).

    Everything that can be checked is checked before the one query (the model's limits, the surrogate's
    smallest input, the run folder), with one-line :class:`ConfigError` s. Writes the run folder ``out``
    (pairs, harvest log, ``surrogate/``, ``run.json`` with an ``imitate`` section holding the size sent).
    Resumes both steps when re-run with the same arguments.
    """
    out = check_out_folder(out)
    if isinstance(image, torch.Tensor):
        x, name, label = image, "example", "the image"
    else:
        x, name, label = read_image(image), Path(image).stem, str(image)
    if add_noise:
        x = add_gaussian_noise(x, add_noise, seed)
    h, w = (int(v) for v in x.shape[-2:])
    try:
        cfg = TrainConfig(arch=arch, profile=profile, steps=steps, seed=seed, device=device, **train_options)
    except ValidationError as exc:
        raise ConfigError(f"bad training option {first_problem(exc)}") from None
    info = fetch_model_info(url, model)  # GET /v1/models: no query spent
    if min(h, w) < info.min_side:
        raise ConfigError(f"{label} is {w}x{h}; model {model!r} takes at least {info.min_side} px a side")
    images = [NamedImage(name, x)]
    params = {"downscale": 1, "noise_sigma": None, "max_side": max(h, w, 8)}
    sent = build_strategy("random", images, info, params, seed, budget=1).make(0).image  # what harvest sends
    sh, sw = (int(v) for v in sent.shape[-2:])
    why = info.accepts(sh, sw)
    png_bytes = len(encode_image(sent, "png"))
    if why is None and info.max_bytes is not None and png_bytes > info.max_bytes:
        why = f"{png_bytes} bytes as PNG exceed max_bytes {info.max_bytes}"
    if why is not None:
        raise ConfigError(f"{label} is {w}x{h}; model {model!r} refuses it ({why})")
    size = f"{w}x{h}" if (sh, sw) == (h, w) else f"{w}x{h} (sent as {sw}x{sh})"
    _check_surrogate_fits(label, size, min(sh, sw), cfg, info)
    if (sh, sw) != (h, w):
        limits = [f"max_pixels {info.max_pixels}" if info.max_pixels is not None and h * w > info.max_pixels
                  else "", f"size_multiple {info.size_multiple}" if info.size_multiple > 1 else ""]
        log.info("%s is %dx%d; sending it as %dx%d to fit model %r (%s)", label, w, h, sw, sh, model,
                 ", ".join(s for s in limits if s) or "its limits")
    try:
        hv = harvest(url, api_keys, model, out, images=images, strategy="random", strategy_params=params, budget=1,
                     seed=seed, client=client, progress=progress)
    except RunFolderError as exc:
        if "holds a harvest with different" not in str(exc):
            raise
        done = read_run(out).get("imitate", {})
        what = f" of {done['image']!r}" if done.get("image") else ""
        raise RunFolderError(f"{out} already holds an imitation{what} with another image, model or options; use a "
                             "new --out (the query is not sent again)") from None
    if hv.pairs == 0:  # the one query went unanswered: say why, not "the manifest holds no pairs yet"
        why = hv.stop_reason or hv.status
        if why == "quota_exhausted":
            raise QuotaExhaustedError(f"the one query was refused: the API key has no quota left (429 "
                                      f"quota_exhausted); nothing to imitate (run folder {out} kept)")
        raise RunFolderError(f"the one query was not answered ({why}); nothing to imitate (run folder {out} kept; "
                             "the same command retries)")
    tr = train_surrogate(out, config=cfg, progress=progress, advice=ADVICE)
    warning = tr.summary.get("warning")
    update_run(out, imitate={
        "image": name, "size": [sh, sw], "original_size": [h, w], "add_noise": add_noise, "queries": 1,
        "arch": arch, "profile": profile, "held_out": tr.held_out, "fidelity_held_out_region": tr.fidelity,
        "baseline_held_out_region": tr.baseline, "checkpoint": str(tr.checkpoint), "warning": warning,
    })
    return ImitationResult(hv, tr, (sh, sw), warning)
