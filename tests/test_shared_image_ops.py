"""The image operations every layer shares: 8-bit quantisation, the JPEG round trip, PSNR/SSIM scoring."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attacker.countermeasures import build_counter
from attacker.fidelity import FIDELITY_SETTINGS, psnr_ssim_l2
from defenses.jpeg import JpegDefense
from defenses.jpeg import jpeg_roundtrip as defenses_jpeg_roundtrip
from evaluation.metrics import MetricSettings as EvalMetricSettings
from evaluation.metrics import psnr, ssim
from translators.codecs import jpeg_roundtrip
from translators.images import from_uint8, quantize_8bit, to_uint8, to_uint8_tensor
from translators.psnr_ssim import MetricSettings, crop_and_convert, psnr_scores, ssim_scores


def test_quantize_8bit_rounds_to_the_png_grid_and_keeps_dtype_and_shape() -> None:
    x = torch.tensor([-0.5, 0.0, 0.31, 0.5, 1.0, 1.7]).view(1, 1, 2, 3)
    q = quantize_8bit(x)
    assert q.shape == x.shape
    assert q.dtype == x.dtype
    assert (q * 255).round().tolist() == [[[[0, 0, 79], [128, 255, 255]]]]
    torch.testing.assert_close(q, x.clamp(0, 1).mul(255).round().div(255), rtol=0, atol=0)
    assert quantize_8bit(x.double()).dtype == torch.float64
    img = torch.rand(1, 3, 9, 7, generator=torch.Generator().manual_seed(0))
    assert torch.equal(quantize_8bit(img), from_uint8(to_uint8(img)))  # what a PNG round trip gives
    assert torch.equal(quantize_8bit(quantize_8bit(img)), quantize_8bit(img))


def test_to_uint8_tensor_matches_the_numpy_form() -> None:
    x = torch.rand(2, 3, 5, 6, generator=torch.Generator().manual_seed(1)) * 1.4 - 0.2
    u = to_uint8_tensor(x)
    assert u.dtype == torch.uint8
    assert u.shape == x.shape
    assert np.array_equal(u[0].permute(1, 2, 0).numpy(), to_uint8(x[:1]))
    assert torch.equal(u, x.mul(255.0).round().clamp(0, 255).to(torch.uint8))


def test_one_jpeg_round_trip_for_defense_and_counter_measure() -> None:
    x = torch.rand(2, 3, 24, 40, generator=torch.Generator().manual_seed(2))
    assert defenses_jpeg_roundtrip is jpeg_roundtrip
    expected = jpeg_roundtrip(x, 40)
    assert expected.shape == x.shape
    assert expected.dtype == x.dtype
    assert torch.equal(expected, quantize_8bit(expected))
    assert torch.equal(build_counter("jpeg:quality=40")(x), expected)
    assert torch.equal(JpegDefense(quality=40).apply_batch(x, x, None), expected)
    assert not torch.equal(jpeg_roundtrip(x, 40, "4:4:4"), expected)


def test_attacker_and_evaluation_score_with_the_same_implementation() -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.rand(2, 3, 32, 48, generator=g)
    y = (x + 0.05 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    assert EvalMetricSettings() == FIDELITY_SETTINGS
    assert EvalMetricSettings is MetricSettings  # re-exported, not copied
    ours = psnr_ssim_l2(x, y)
    assert ours["psnr"] == pytest.approx(float(psnr(x, y, data_range=1.0)), abs=1e-5)
    assert ours["ssim"] == pytest.approx(float(ssim(x, y, data_range=1.0)), abs=1e-6)
    # identical images: the same finite number everywhere (piq's 1e-8 floor), not a private cap
    assert psnr_ssim_l2(x, x)["psnr"] == pytest.approx(float(psnr(x, x, data_range=1.0))) == pytest.approx(80.0)
    # images smaller than the SSIM window: no silently shrunk window
    assert np.isnan(psnr_ssim_l2(x[..., :9, :9], y[..., :9, :9])["ssim"])
    with pytest.raises(ValueError, match="at least 11 px"):
        ssim_scores(x[..., :9, :9], y[..., :9, :9], MetricSettings())


def test_core_applies_crop_and_colour_space() -> None:
    x = torch.rand(1, 3, 20, 20, generator=torch.Generator().manual_seed(4))
    s = MetricSettings(crop_border=2, color_space="y")
    a, b = crop_and_convert(x, x.flip(-1), s)
    assert a.shape == (1, 1, 16, 16)
    assert float(psnr_scores(a, b, s)) == pytest.approx(float(psnr(x, x.flip(-1), crop_border=2, color_space="y")))
    with pytest.raises(ValueError, match="leaves nothing"):
        crop_and_convert(x, x, MetricSettings(crop_border=10))
