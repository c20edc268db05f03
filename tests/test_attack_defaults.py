"""The attacker's defaults on victims it was never tuned on (issue 14): auto-sized queries, the residual
U-Net surrogate, plateau/time stopping, ``--arch auto`` selection and the baseline warning."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest
import torch

from attacker.fidelity import baseline, psnr_ssim_l2, translate
from attacker.harvest import harvest
from attacker.runinfo import read_run
from attacker.strategies import build_strategy
from attacker.train import train_surrogate
from attacker.victim_info import ModelInfo
from tests.servers import start_victim
from tests.test_attack_train import colour_blur, make_run
from translators.checkpoint import load_model
from translators.codecs import decode_image, encode_image
from translators.corpus import load_images
from translators.images import center_crop


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def test_auto_crop_size_follows_budget_and_limits() -> None:
    images = load_images("corpus:attacker")
    info = ModelInfo(name="m", task="style")

    def side(budget: int | None, **kw: object) -> int:
        return build_strategy("crops", images, info.model_copy(update=kw), {}, budget=budget).crop_size

    shorts = sorted(min(im.image.shape[-2:]) for im in images)
    median = shorts[(len(shorts) - 1) // 2]
    assert side(None) == 64  # no budget known: the old default
    assert side(1) == median  # one query: (almost) a whole photo
    assert side(256) == 128 < side(64) == 256 < side(16) <= median
    assert side(1, max_pixels=96 * 96) == 96  # the published limit wins
    sr = build_strategy("crops", images, ModelInfo(name="s", task="sr", scale=4), {}, budget=64)
    assert sr.crop_size == 64  # 256 output pixels a side at x4


def test_noisy_identity_victim_triggers_the_baseline_warning(tmp_path: Path) -> None:
    """Output = input + fresh noise: nothing beats the identity, and the CLI must say so loudly."""
    gen = torch.Generator().manual_seed(0)

    def noisy(x: torch.Tensor) -> torch.Tensor:
        return (x + 0.08 * torch.randn(x.shape, generator=gen)).clamp(0, 1)

    run = make_run(tmp_path / "run", noisy, 1, 4, 32, "style")
    env = {**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "heist.cli.main", "attack", "train", "--pairs", str(run),
                          "--arch", "unet-l2", "--profile", "tiny", "--steps", "4", "--device", "cpu"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "WARNING" in res.stderr
    assert "NOT better than the trivial identity baseline" in res.stderr
    train = read_run(run)["train"]
    assert train["beats_baseline"] is False
    assert train["fidelity"]["psnr"] <= train["baseline"]["psnr"]
    assert "NOT better" in train["warning"]


@pytest.mark.slow
def test_auto_tries_candidates_and_keeps_the_best(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", colour_blur, 1, 6, 48, "style")
    r = train_surrogate(run, arch="auto", profile="tiny", steps=60, val_every=10, time_budget=None)
    auto = r.summary["auto"]
    assert auto["candidates"] == ["resunet", "pix2pix"]
    assert set(auto["trial_psnr"]) == {"resunet", "pix2pix"}
    # resunet (the default) is kept unless the other trial beats it by the margin
    t = auto["trial_psnr"]
    assert auto["chosen"] == ("pix2pix" if t["pix2pix"] > t["resunet"] + auto["margin_db"] else "resunet")
    assert r.summary["kind"] == auto["chosen"]
    assert json.loads((run / "surrogate" / "auto.json").read_text())["chosen"] == auto["chosen"]
    assert r.summary["beats_baseline"] is True
    # the checkpoint holds the best validation, whatever step training stopped at
    assert r.fidelity["psnr"] == pytest.approx(max(v["psnr"] for v in r.val_curve))
    # a re-run resumes the chosen kind without new trials and ends where the first run ended
    again = train_surrogate(run, arch="auto", profile="tiny", steps=60, val_every=10, time_budget=None)
    assert again.summary["kind"] == auto["chosen"]
    assert again.steps == r.steps


def _gentle_grade(x: torch.Tensor) -> torch.Tensor:
    """A victim close to the identity (mild gamma): the identity baseline is already high."""
    return x.clamp(0, 1) ** 0.95


@pytest.mark.slow
def test_auto_never_returns_a_surrogate_below_resunet(tmp_path: Path) -> None:
    """Issue 14's bug: auto kept pix2pix after short trials and ended below the identity baseline.
    A negative margin forces the pix2pix trial to win; after its few steps it is far below resunet (which
    starts as the identity), so auto must fall back to resunet's weights: never below the baseline."""
    run = make_run(tmp_path / "run", _gentle_grade, 1, 4, 32, "style")
    r = train_surrogate(run, arch="auto", profile="tiny", steps=12, val_every=4, time_budget=None,
                        auto_margin_db=-1000.0, device="cpu")
    auto = r.summary["auto"]
    assert auto["fallback_from"] == "pix2pix"
    assert auto["chosen"] == r.summary["kind"] == "resunet"
    assert auto["fallback_psnr"] < r.fidelity["psnr"]
    assert r.fidelity["psnr"] >= r.summary["baseline"]["psnr"] - 1e-6
    assert load_model(r.checkpoint).card.arch == r.summary["arch"]
    assert json.loads((run / "surrogate" / "auto.json").read_text())["chosen"] == "resunet"


@pytest.mark.slow
def test_auto_keeps_resunet_unless_clearly_beaten(tmp_path: Path) -> None:
    """With an unreachable margin the other candidate's trial can never displace resunet."""
    run = make_run(tmp_path / "run", _gentle_grade, 1, 4, 32, "style")
    r = train_surrogate(run, arch="auto", profile="tiny", steps=12, val_every=4, time_budget=None,
                        auto_margin_db=1000.0, device="cpu")
    assert r.summary["auto"]["chosen"] == r.summary["kind"] == "resunet"
    assert "fallback_from" not in r.summary["auto"]
    assert r.summary["beats_baseline"] or r.fidelity["psnr"] >= r.summary["baseline"]["psnr"] - 1e-6


@pytest.mark.slow
def test_steals_a_new_zoo_victim_through_the_service(tmp_path: Path, redis_url: str) -> None:
    """Harvest 4 default-sized queries from the tiny ``style-grade`` victim over HTTP; the default
    surrogate must beat the identity baseline by > 2 dB on unseen benchmark photos (fixed seeds)."""
    srv = start_victim(tmp_path / "srv", models=[{"name": "style-grade", "source": "zoo:style-grade@tiny"}],
                       tiers={"open": {"rate": None}}, keys={"attacker": "open"}, redis_url=redis_url,
                       key_prefix=f"heist-test:{uuid.uuid4().hex[:12]}:", ready_timeout=600)
    try:
        run = tmp_path / "run"
        h = harvest(srv.url, srv.keys["attacker"], "style-grade", run, budget=4, seed=0, durable=False)
        assert h.pairs == 4
        assert h.summary["strategy"]["crop_size"] >= 256
        r = train_surrogate(run, arch="resunet", profile="tiny", steps=150, val_every=25, time_budget=60, seed=0,
                            device="cpu")
        assert r.summary["beats_baseline"] is True
        assert r.summary["gain_db"] > 2.0
        sur = load_model(r.checkpoint).module
        gains = []
        for im in load_images("corpus:benchmark")[:3]:
            x = center_crop(im.image, 128)
            resp = httpx.post(f"{srv.url}/v1/models/style-grade/translate", content=encode_image(x),
                              headers={**srv.headers("attacker"), "Content-Type": "image/png"}, timeout=60)
            assert resp.status_code == 200, resp.text
            v = decode_image(resp.content)
            gains.append(psnr_ssim_l2(translate(sur, x), v)["psnr"] - psnr_ssim_l2(baseline(x, 1), v)["psnr"])
        assert min(gains) > 2.0, gains
    finally:
        srv.stop()
