"""Attacker counter-measures against output perturbation: specs parse or fail with the valid kinds, each
filter keeps shape and range, and on a smooth image carrying a +-eps sign perturbation the filters bring the
output back towards the clean one; the defense-aware mode estimates eps from the outputs alone."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from attacker.countermeasures import (
    CounterSpec,
    build_counter,
    estimate_amplitude,
    gaussian_blur,
    median_filter,
    parse_counter,
)
from attacker.errors import ConfigError
from evaluation.metrics import psnr

EPS = 4 / 255


def smooth(n: int = 2, side: int = 48, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, side // 8, side // 8, generator=g)
    return (0.15 + 0.7 * F.interpolate(low, size=(side, side), mode="bicubic", align_corners=False)).clamp(0, 1)


def signed(clean: torch.Tensor, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (clean + EPS * torch.sign(torch.randn(clean.shape, generator=g))).clamp(0, 1)


def test_specs_parse_and_bad_specs_name_the_valid_choices() -> None:
    assert parse_counter("lowpass:sigma=1.5") == CounterSpec(kind="lowpass", sigma=1.5)
    assert parse_counter("jpeg:quality=60").describe() == "jpeg:quality=60"
    assert parse_counter("aware").amp is None
    assert parse_counter(" median : size=5 ".replace(" ", "")).size == 5
    with pytest.raises(ConfigError, match="kinds: none, lowpass, jpeg, median, aware"):
        parse_counter("wavelet")
    with pytest.raises(ConfigError, match="sigma"):
        parse_counter("lowpass:sigma=0")
    with pytest.raises(ConfigError, match="key=value"):
        parse_counter("jpeg:60")
    with pytest.raises(ConfigError, match="colour"):
        parse_counter("median:colour=3")


@pytest.mark.parametrize("spec", ["none", "lowpass", "jpeg:quality=90", "median", "aware"])
def test_every_counter_measure_keeps_shape_and_range(spec: str) -> None:
    y = signed(smooth())
    cm = build_counter(spec).fit([y])
    out = cm(y)
    assert out.shape == y.shape
    assert out.min().item() >= 0.0
    assert out.max().item() <= 1.0
    u8 = cm.apply_uint8([o.mul(255).round().to(torch.uint8) for o in y])
    assert [t.dtype for t in u8] == [torch.uint8, torch.uint8]
    assert u8[0].shape == y[0].shape


@pytest.mark.parametrize("spec", ["lowpass:sigma=1.0", "median", "aware"])
def test_filters_pull_a_sign_perturbed_output_back_towards_the_clean_one(spec: str) -> None:
    clean = smooth()
    y = signed(clean)
    cleaned = build_counter(spec).fit([y])(y)
    before = psnr(y, clean, data_range=1.0).mean().item()
    after = psnr(cleaned, clean, data_range=1.0).mean().item()
    assert after > before + 2.0, f"{spec}: {before:.2f} -> {after:.2f} dB"


def test_the_defense_aware_mode_estimates_the_amplitude_from_outputs_only() -> None:
    clean = smooth(side=64)
    a = estimate_amplitude([signed(clean)[i] for i in range(2)])
    assert 0.6 * EPS < a < 1.4 * EPS
    assert estimate_amplitude([clean]) < 0.3 * EPS, "a clean smooth output has almost no high-pass residual"
    fixed = build_counter("aware:amp=0.01").fit([signed(clean)])
    assert fixed.amplitude == 0.01


def test_blur_and_median_keep_constants_and_median_removes_impulses() -> None:
    flat = torch.full((1, 3, 9, 11), 0.4)
    assert torch.allclose(gaussian_blur(flat, 1.5), flat, atol=1e-6)
    spiky = flat.clone()
    spiky[0, :, 4, 5] = 1.0
    assert torch.allclose(median_filter(spiky, 3), flat)
    with pytest.raises(ValueError, match="odd"):
        median_filter(flat, 4)


def test_train_refuses_a_bad_counter_measure_before_reading_pairs(tmp_path: Path) -> None:
    from attacker.train import train_surrogate

    # tmp_path holds no pairs: the spec is checked first (the CLI prints this ConfigError on one line, exit 2)
    with pytest.raises(ConfigError, match="bad counter-measure 'wavelet'"):
        train_surrogate(tmp_path, counter="wavelet")


def test_train_applies_the_counter_measure_records_it_and_refuses_to_resume_with_another(tmp_path: Path) -> None:
    from attacker.errors import TrainingError
    from attacker.train import train_surrogate
    from tests.test_attack_train import colour_blur, make_run

    torch.set_num_threads(1)
    run = make_run(tmp_path / "run", colour_blur, 1, n=3, side=32, task="style")
    kw = {"arch": "unet-l2", "profile": "tiny", "steps": 3, "arch_kwargs": {"base": 8, "depth": 3}}
    r = train_surrogate(run, counter="aware", **kw)
    assert r.summary["counter"] == "aware"
    assert 0.0 < r.summary["counter_amplitude"] < 0.05
    with pytest.raises(TrainingError, match="--restart"):
        train_surrogate(run, counter="median", **kw)
    plain = train_surrogate(run, tmp_path / "plain", **kw)
    assert plain.summary["counter"] == "none"
    assert plain.fidelity["psnr"] != r.fidelity["psnr"], "the held-out targets were filtered too"
