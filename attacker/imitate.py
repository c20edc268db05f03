"""Single-example imitation (Spingarn-Eliezer & Michaeli): one query, then an L2 U-Net on random crops.

The attacker sends one image, gets the victim's output, and trains a ``unet-l2`` surrogate on random
crops of that single pair (every output pixel is a training sample whose context is one receptive
field). Fidelity is measured on a held-out stripe of the pair (a quarter along its longer side), as
the paper tests on unseen regions; evaluating on other images costs more queries and is left to the
evaluator.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from attacker.client import ClientConfig
from attacker.harvest import HarvestResult, harvest
from attacker.progress import ProgressHook
from attacker.runinfo import update_run
from attacker.train import TrainConfig, TrainResult, train_surrogate
from translators.codecs import read_image
from translators.corpus import NamedImage

log = logging.getLogger(__name__)


@dataclass
class ImitationResult:
    harvest: HarvestResult
    train: TrainResult

    @property
    def checkpoint(self) -> Path:
        return self.train.checkpoint

    @property
    def run_json(self) -> Path:
        return self.harvest.run_json


def add_gaussian_noise(x: torch.Tensor, sigma: float, seed: int = 0) -> torch.Tensor:
    """``x + N(0, (sigma/255)^2)``, clamped and quantised to 8 bits; ``x`` ``(1, 3, H, W)`` in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    y = (x + torch.randn(x.shape, generator=g) * (sigma / 255.0)).clamp(0, 1)
    return y.mul(255).round().div(255)


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
        image: a file path or a ``(1, 3, H, W)`` tensor in [0, 1], sent as it is (PNG), at full size.
        add_noise: add Gaussian noise of this sigma (0..255 scale) first, e.g. to make a clean photo a
            sensible input for a denoiser.
        arch / profile / steps / seed / device and ``train_options``: passed to
            :func:`attacker.train.train_surrogate` (fields of :class:`~attacker.train.TrainConfig`).

    Writes the run folder ``out`` (pairs, harvest log, ``surrogate/``, ``run.json`` with an ``imitate``
    section). Resumes both steps when re-run with the same arguments.
    """
    if isinstance(image, torch.Tensor):
        x, name = image, "example"
    else:
        x, name = read_image(image), Path(image).stem
    if add_noise:
        x = add_gaussian_noise(x, add_noise, seed)
    h, w = x.shape[-2:]
    hv = harvest(url, api_keys, model, out, images=[NamedImage(name, x)], strategy="random",
                 strategy_params={"downscale": 1, "noise_sigma": None, "max_side": max(h, w)}, budget=1,
                 seed=seed, client=client, progress=progress)
    cfg = TrainConfig(arch=arch, profile=profile, steps=steps, seed=seed, device=device, **train_options)
    tr = train_surrogate(out, config=cfg, progress=progress)
    update_run(out, imitate={
        "image": name, "size": [int(h), int(w)], "add_noise": add_noise, "queries": 1, "arch": arch,
        "profile": profile, "held_out": tr.held_out, "fidelity_held_out_region": tr.fidelity,
        "baseline_held_out_region": tr.baseline, "checkpoint": str(tr.checkpoint),
    })
    return ImitationResult(hv, tr)
