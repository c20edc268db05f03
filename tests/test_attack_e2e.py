"""Stealing zoo victims end to end through the real API: the CLI commands of docs/attacker.md and
single-example imitation of the tiny zoo denoiser, scored against the victim on unseen benchmark images."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from attacker import imitate
from attacker.fidelity import psnr_ssim_l2, translate
from attacker.runinfo import read_run
from tests.servers import VictimServer, start_victim
from translators.checkpoint import load_model
from translators.codecs import decode_image, encode_image, write_image
from translators.corpus import load_images
from translators.images import center_crop
from translators.zoo import get_recipe

log = logging.getLogger(__name__)


@pytest.fixture(scope="module")
def zoo_victim(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[VictimServer]:
    tmp = tmp_path_factory.mktemp("zoo-victim")
    srv = start_victim(
        tmp,
        models=[{"name": "denoise25", "source": "zoo:denoise25@tiny"}],
        tiers={"open": {"rate": None}, "fast": {"rate": 20.0, "burst": 10}},
        keys={"attacker": "fast", "evaluator": "open"},
        redis_url=redis_url, key_prefix=f"heist-test:{uuid.uuid4().hex[:12]}:", ready_timeout=600,
    )
    yield srv
    srv.stop()


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", "from heist.cli.main import main; main()", *args],
                          capture_output=True, text=True, timeout=timeout, env=env)


def _victim_output(srv: VictimServer, x: torch.Tensor, model: str) -> torch.Tensor:
    r = httpx.post(f"{srv.url}/v1/models/{model}/translate", content=encode_image(x),
                   headers={**srv.headers("evaluator"), "Content-Type": "image/png"}, timeout=60)
    assert r.status_code == 200, r.text
    return decode_image(r.content)


def test_cli_harvest_train_status_steals_the_zoo_denoiser(zoo_victim: VictimServer, tmp_path: Path) -> None:
    run = tmp_path / "a1"
    cp = _cli("attack", "models", "--url", zoo_victim.url)
    assert cp.returncode == 0, cp.stderr
    assert "denoise25" in cp.stdout
    assert "dncnn" not in cp.stdout.lower()  # the attacker never learns the architecture
    cp = _cli("attack", "harvest", "--url", zoo_victim.url, "--api-key", zoo_victim.keys["attacker"], "--model",
              "denoise25", "--images", "corpus:attacker", "--budget", "32", "--crop-size", "48", "--out", str(run))
    assert cp.returncode == 0, cp.stderr
    assert "32/32 pairs" in cp.stdout
    cp = _cli("attack", "train", "--pairs", str(run), "--profile", "tiny", "--steps", "250")
    assert cp.returncode == 0, cp.stderr
    assert "held-out pairs vs victim" in cp.stdout
    summary = read_run(run)
    tr = summary["train"]
    # auto: the default resunet and, the public task being denoise, the paper's L2 U-Net
    assert tr["auto"]["candidates"] == ["resunet", "unet-l2"]
    assert tr["kind"] == tr["auto"]["chosen"]
    assert tr["fidelity"]["l2"] < 0.7 * tr["baseline"]["l2"]  # clearly beats the identity baseline
    assert tr["val_curve"][-1]["l2"] < tr["val_curve"][0]["l2"]
    assert summary["harvest"]["pairs"] == 32
    surrogate = load_model(run / tr["checkpoint"])
    assert surrogate.card.task == "denoise"
    assert surrogate.card.arch == {"resunet": "resunet", "unet-l2": "unet"}[tr["kind"]]
    cp = _cli("attack", "status", str(run))
    assert cp.returncode == 0, cp.stderr
    assert json.loads(cp.stdout)["train"]["kind"] == tr["kind"]


def test_single_example_imitation_beats_identity_on_unseen_benchmark_images(
    zoo_victim: VictimServer, tmp_path: Path
) -> None:
    torch.set_num_threads(1)
    recipe = get_recipe("denoise25")
    photo = load_images("corpus:attacker")[0].image
    example, _ = recipe.make_pair(center_crop(photo, 256), seed=1)
    r = imitate(zoo_victim.url, zoo_victim.keys["attacker"], "denoise25", example, tmp_path / "one",
                profile="tiny", steps=600)
    assert r.harvest.pairs == 1
    assert read_run(tmp_path / "one")["harvest"]["queries_sent"] == 1
    assert r.train.held_out == "region"
    surrogate = load_model(r.checkpoint).module
    sur_psnr, id_psnr = [], []
    for i, im in enumerate(load_images("corpus:benchmark")):
        x, _ = recipe.make_pair(center_crop(im.image, min(128, *im.image.shape[-2:])), seed=100 + i)
        v = _victim_output(zoo_victim, x, "denoise25")
        sur_psnr.append(psnr_ssim_l2(translate(surrogate, x), v)["psnr"])
        id_psnr.append(psnr_ssim_l2(x, v)["psnr"])
    sur, ident = sum(sur_psnr) / len(sur_psnr), sum(id_psnr) / len(id_psnr)
    log.info("single-example imitation of tiny denoise25: surrogate vs victim %.2f dB, identity %.2f dB", sur, ident)
    assert sur > ident + 3.0, (sur, ident)


def test_cli_imitate_runs_end_to_end(zoo_victim: VictimServer, tmp_path: Path) -> None:
    photo = load_images("corpus:attacker")[1].image
    img = tmp_path / "one.png"
    write_image(center_crop(photo, 96), img)
    cp = _cli("attack", "imitate", "--url", zoo_victim.url, "--api-key", zoo_victim.keys["attacker"], "--model",
              "denoise25", "--image", str(img), "--add-noise", "25", "--out", str(tmp_path / "im"), "--profile", "tiny",
              "--steps", "30")
    assert cp.returncode == 0, cp.stderr
    assert "1 query -> surrogate" in cp.stdout
    assert "held-out region vs victim" in " ".join(cp.stdout.split())  # a 96 px photo spares a stripe
    run = read_run(tmp_path / "im")
    assert run["imitate"]["queries"] == 1
    assert run["imitate"]["add_noise"] == 25
    assert Path(run["imitate"]["checkpoint"]).exists()
    other = tmp_path / "other.png"
    write_image(center_crop(load_images("corpus:attacker")[2].image, 96), other)
    again = _cli("attack", "imitate", "--url", zoo_victim.url, "--api-key", zoo_victim.keys["attacker"], "--model",
                 "denoise25", "--image", str(other), "--add-noise", "25", "--out", str(tmp_path / "im"), "--profile",
                 "tiny", "--steps", "30")
    assert again.returncode == 2
    assert "already holds an imitation of 'one' with another image" in again.stderr, again.stderr
