"""The victim zoo: recipes produce the right pairs, training is seeded, tiny victims beat their baselines."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from translators.checkpoint import load_model
from translators.corpus import load_images
from translators.images import center_crop
from translators.zoo import (
    ZOO,
    build,
    cached_checkpoint,
    evaluate_recipe_model,
    get_recipe,
    train_recipe,
    zoo_checkpoint,
)
from translators.zoo.stylizers import STYLIZERS


def test_zoo_lists_the_paper_tasks() -> None:
    names = ZOO.names()
    assert {"sr4x", "denoise25"} <= set(names)
    assert any(n.startswith("style-") for n in names)


def test_sr_pair_is_bicubic_downscale() -> None:
    r = get_recipe("sr4x")
    clean = torch.rand(1, 3, 66, 50)
    inp, target = r.make_pair(clean)
    assert target.shape == (1, 3, 64, 48)
    assert inp.shape == (1, 3, 16, 12)
    assert torch.equal(target, clean[..., :64, :48])


def test_denoise_pair_has_sigma_25_noise_quantised_to_8_bits() -> None:
    r = get_recipe("denoise25")
    clean = torch.full((1, 3, 128, 128), 0.5)
    noisy, target = r.make_pair(clean, seed=3)
    assert torch.equal(target, clean)
    std = float((noisy - clean).std())
    assert abs(std - 25 / 255) < 0.005
    assert torch.allclose(noisy * 255, (noisy * 255).round(), atol=1e-4)
    again, _ = r.make_pair(clean, seed=3)
    assert torch.equal(noisy, again)


@pytest.mark.parametrize("style", sorted(STYLIZERS))
def test_stylizers_keep_shape_and_range_and_change_the_image(style: str) -> None:
    x = load_images("corpus:benchmark", max_side=64)[0].image
    y = STYLIZERS[style](x)
    assert y.shape == x.shape
    assert float(y.min()) >= 0.0
    assert float(y.max()) <= 1.0
    assert float((y - x).abs().mean()) > 0.02


def test_training_is_deterministic_for_a_seed() -> None:
    base = get_recipe("denoise25")
    spec = dataclasses.replace(base.specs["tiny"], steps=4)
    recipe = dataclasses.replace(base, specs={"tiny": spec})
    a, _ = train_recipe(recipe, "tiny", seed=7, device="cpu")
    b, _ = train_recipe(recipe, "tiny", seed=7, device="cpu")
    c, _ = train_recipe(recipe, "tiny", seed=8, device="cpu")
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sr4x", "denoise25", "style-ink", "style-teal", "style-grade", "style-toon"])
def test_tiny_victim_beats_its_trivial_baseline(name: str) -> None:
    path = build(name, "tiny")
    assert path == zoo_checkpoint(name, "tiny")
    card = json.loads(path.with_suffix(".json").read_text())
    m = card["metrics"]
    assert m["split"] == "benchmark"
    assert m["psnr"] > m["baseline_psnr"] + 0.3, m
    assert card["training"]["data_split"] == "victim"
    # The cached checkpoint reloads and reproduces the recorded score.
    loaded = load_model(path)
    recipe = get_recipe(name)
    again = evaluate_recipe_model(recipe, loaded.module, recipe.specs["tiny"].eval_side)
    assert again["psnr"] == pytest.approx(m["psnr"], abs=1e-3)
    assert loaded.card.scale == recipe.scale


def test_build_uses_the_cache() -> None:
    path = build("denoise25", "tiny")
    mtime = path.stat().st_mtime_ns
    assert build("denoise25", "tiny") == path
    assert path.stat().st_mtime_ns == mtime


def test_cache_needs_the_card_and_the_seed(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`heist zoo build` said "cached" for weights whose card was lost (a kill between the two writes) and
    for a model trained with another seed than --seed asked for."""
    monkeypatch.setenv("HEIST_DATA_DIR", str(tmp_path))
    path = build("denoise25", "tiny")
    assert cached_checkpoint("denoise25", "tiny", seed=0) == path
    assert cached_checkpoint("denoise25", "tiny", seed=7) is None
    path.with_suffix(".json").unlink()
    assert cached_checkpoint("denoise25", "tiny") is None
    res = subprocess.run([sys.executable, "-m", "heist.cli.main", "zoo", "build", "denoise25", "--seed", "3"],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "200"})
    assert res.returncode == 0, res.stderr
    assert "cached" not in res.stdout
    assert "PSNR" in res.stdout
    assert json.loads(path.with_suffix(".json").read_text())["training"]["seed"] == 3


def test_victim_is_trained_on_victim_split_only() -> None:
    r = get_recipe("sr4x")
    bench = load_images("corpus:benchmark")
    victim = {im.name for im in load_images("corpus:victim")}
    assert not victim & {im.name for im in bench}
    # evaluation crops come from the benchmark split
    x = center_crop(bench[0].image, 64)
    inp, target = r.make_pair(x)
    assert inp.shape[-1] * 4 == target.shape[-1]


def test_cli_unknown_zoo_model_is_one_line_error() -> None:
    res = subprocess.run([sys.executable, "-m", "heist.cli.main", "zoo", "build", "nope"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert "unknown zoo model 'nope'" in res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.parametrize("profile", ["tiny", "default", "full"])
def test_style_cards_declare_the_unet_size_multiple(profile: str) -> None:
    recipe = get_recipe("style-ink")
    depth = int(recipe.specs[profile].arch_kwargs["depth"])
    assert recipe.size_multiple(profile) == 2**depth
    inp, target = recipe.make_pair(torch.rand(1, 3, 70, 90), multiple=2**depth if depth < 8 else 16)
    assert inp.shape[-1] % min(2**depth, 16) == 0
    assert target.shape == inp.shape


def test_zoo_list_names_a_torn_card_instead_of_crashing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A kill while a card was written leaves it torn: ``heist zoo list`` says so and lists the rest."""
    monkeypatch.setenv("HEIST_DATA_DIR", str(tmp_path))
    weights = zoo_checkpoint("sr4x", "tiny")
    assert tmp_path in weights.parents
    weights.parent.mkdir(parents=True, exist_ok=True)
    weights.write_bytes(b"weights")
    weights.with_suffix(".json").write_text('{"name": "sr4x", "arch": "srres')
    res = subprocess.run([sys.executable, "-m", "heist.cli.main", "zoo", "list"], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "COLUMNS": "250"})
    assert res.returncode == 0, res.stderr
    assert "card unreadable" in res.stdout
    assert "denoise25" in res.stdout
