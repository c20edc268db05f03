"""``heist defend akd|dmp|dpsgd``: model-level membership defenses; each writes a new checkpoint to serve."""

from __future__ import annotations

from pathlib import Path

import typer

from heist.cli.common import console, device_option, seed_option


def register(app: typer.Typer) -> None:
    """Add ``akd``, ``dmp`` and ``dpsgd`` to the ``heist defend`` group (heist/cli/defend.py)."""
    app.command("akd")(akd)
    app.command("dmp")(dmp)
    app.command("dpsgd")(dpsgd)

_VICTIM = typer.Option(..., "--victim", help="The private victim checkpoint (.safetensors with a membership card).")
_OUT = typer.Option(..., "--out", help="Checkpoint to write (.safetensors + .json card).")
_PROXY_PAIRS = typer.Option(None, "--proxy-pairs", min=1, help="Proxy inputs (default: 4 x the private set).")


def akd(
    victim: Path = _VICTIM, out: Path = _OUT,
    proxy: str = typer.Option("corpus:attacker", help="Public proxy images (checked disjoint from the private set)."),
    steps: int | None = typer.Option(None, min=1, help="Training steps (default: the victim's)."),
    proxy_pairs: int | None = _PROXY_PAIRS,
    lambda_l1: float = typer.Option(100.0, "--lambda-l1", min=1e-6,
                                    help="Weight of the L1 term against the adversarial one (the paper's 100)."),
    seed: int = seed_option("the student's initialisation and proxy crops"), device: str = device_option(),
) -> None:
    """Adversarial Knowledge Distillation: student + PatchGAN, lambda x L1 to the teacher, on a proxy set."""
    from defenses.model_level.akd import distill

    path = distill(victim, out, name=out.stem, adversarial=True, steps=steps, seed=seed, device=device,
                   proxy_images=proxy, n_proxy=proxy_pairs, lambda_l1=lambda_l1)
    console.print(f"AKD student: {path}")


def dmp(
    victim: Path = _VICTIM, out: Path = _OUT,
    proxy: str = typer.Option("corpus:attacker", help="Public proxy images (checked disjoint from the private set)."),
    steps: int | None = typer.Option(None, min=1, help="Training steps (default: the victim's)."),
    proxy_pairs: int | None = _PROXY_PAIRS,
    seed: int = seed_option("the student's initialisation and proxy crops"), device: str = device_option(),
) -> None:
    """DMP-style distillation: the student learns the teacher's outputs on the proxy set (L1, no discriminator)."""
    from defenses.model_level.akd import distill

    path = distill(victim, out, name=out.stem, adversarial=False, steps=steps, seed=seed, device=device,
                   proxy_images=proxy, n_proxy=proxy_pairs)
    console.print(f"DMP student: {path}")


def dpsgd(
    victim: Path = _VICTIM, out: Path = _OUT,
    noise_multiplier: float = typer.Option(..., "--noise-multiplier", help="DP-SGD noise sigma (> 0)."),
    max_grad_norm: float = typer.Option(1.0, "--max-grad-norm", min=0.0, help="Per-sample clipping norm."),
    steps: int | None = typer.Option(None, min=1, help="Training steps (default: the victim's)."),
    seed: int = seed_option("the initialisation, batches and DP noise"), device: str = device_option(),
) -> None:
    """Retrain the victim on its private pairs with DP-SGD (opacus; pip install 'i2i-heist\\[privacy]')."""
    from defenses.model_level.dpsgd import train_dpsgd

    path = train_dpsgd(victim, out, name=out.stem, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                       steps=steps, seed=seed, device=device)
    console.print(f"DP-SGD model: {path}")
