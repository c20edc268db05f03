"""Image metrics against scikit-image / numpy references, and the streaming aggregator."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from scipy.signal import convolve2d
from skimage.color import rgb2ycbcr
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from evaluation.errors import EvaluationError
from evaluation.metrics import (
    METRICS,
    MSSSIM,
    PSNR,
    SSIM,
    MetricSettings,
    ScoreAggregator,
    build_metric,
    ms_ssim,
    psnr,
    rgb_to_y,
    score_pairs,
    ssim,
)


def _pair(n: int = 3, h: int = 64, w: int = 80, noise: float = 0.08, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    ref = torch.rand(n, 3, h, w, generator=g)
    # smooth the reference a little so SSIM is far from 0 and from 1
    ref = torch.nn.functional.avg_pool2d(ref, 3, stride=1, padding=1, count_include_pad=False)
    dist = (ref + noise * torch.randn(ref.shape, generator=g)).clamp(0, 1)
    return dist, ref


def _np(t: torch.Tensor, i: int) -> np.ndarray:
    return t[i].permute(1, 2, 0).double().numpy()


@pytest.mark.parametrize(("crop", "space", "scale"), [(0, "rgb", 1.0), (4, "rgb", 1.0), (0, "y", 1.0),
                                                       (3, "y", 1.0), (2, "rgb", 255.0)])
def test_psnr_matches_skimage(crop: int, space: str, scale: float) -> None:
    x, y = _pair()
    x, y = x * scale, y * scale
    got = psnr(x, y, data_range=scale, crop_border=crop, color_space=space, reduction="none")  # type: ignore[arg-type]
    for i in range(x.shape[0]):
        a, b = _np(x, i), _np(y, i)
        if crop:
            a, b = a[crop:-crop, crop:-crop], b[crop:-crop, crop:-crop]
        dr = scale
        if space == "y":
            a, b = rgb2ycbcr(a / scale)[..., 0] / 255.0, rgb2ycbcr(b / scale)[..., 0] / 255.0
            dr = 1.0
        ref = peak_signal_noise_ratio(b, a, data_range=dr)
        assert float(got[i]) == pytest.approx(ref, rel=1e-6, abs=1e-6)


@pytest.mark.parametrize(("crop", "space", "scale"), [(0, "rgb", 1.0), (4, "rgb", 1.0), (0, "y", 1.0),
                                                       (2, "rgb", 255.0)])
def test_ssim_matches_skimage(crop: int, space: str, scale: float) -> None:
    x, y = _pair()
    x, y = x * scale, y * scale
    got = ssim(x, y, data_range=scale, crop_border=crop, color_space=space, reduction="none")  # type: ignore[arg-type]
    for i in range(x.shape[0]):
        a, b = _np(x, i), _np(y, i)
        if crop:
            a, b = a[crop:-crop, crop:-crop], b[crop:-crop, crop:-crop]
        kw = {"gaussian_weights": True, "sigma": 1.5, "use_sample_covariance": False}
        if space == "y":
            ya, yb = rgb2ycbcr(a / scale)[..., 0] / 255.0, rgb2ycbcr(b / scale)[..., 0] / 255.0
            ref = structural_similarity(yb, ya, data_range=1.0, **kw)
        else:
            ref = structural_similarity(b, a, data_range=scale, channel_axis=2, **kw)
        assert 0.2 < ref < 0.99  # a meaningful comparison, not a trivial 0 or 1
        assert float(got[i]) == pytest.approx(ref, abs=2e-5)


def _ms_ssim_reference(x: np.ndarray, y: np.ndarray) -> float:
    """MS-SSIM (Wang, Simoncelli, Bovik 2003) per channel with numpy/scipy, channels averaged.

    11x11 Gaussian window (sigma 1.5), valid region, 2x2 average pooling between scales; sides are
    multiples of 16 so no padding is involved.
    """
    weights = [0.0448, 0.2856, 0.3001, 0.2363, 0.1333]
    coords = np.arange(11) - 5.0
    g = np.exp(-(coords[:, None] ** 2 + coords[None, :] ** 2) / (2 * 1.5**2))
    g /= g.sum()
    c1, c2 = 0.01**2, 0.03**2
    per_channel = []
    for ch in range(x.shape[2]):
        a, b = x[..., ch], y[..., ch]
        vals = []
        for level in range(5):
            if level:
                a = a.reshape(a.shape[0] // 2, 2, a.shape[1] // 2, 2).mean(axis=(1, 3))
                b = b.reshape(b.shape[0] // 2, 2, b.shape[1] // 2, 2).mean(axis=(1, 3))

            def f(z: np.ndarray) -> np.ndarray:
                return convolve2d(z, g, mode="valid")

            mu_a, mu_b = f(a), f(b)
            saa, sbb, sab = f(a * a) - mu_a**2, f(b * b) - mu_b**2, f(a * b) - mu_a * mu_b
            cs = (2 * sab + c2) / (saa + sbb + c2)
            lum = (2 * mu_a * mu_b + c1) / (mu_a**2 + mu_b**2 + c1)
            vals.append((lum * cs).mean() if level == 4 else cs.mean())
        per_channel.append(np.prod([max(v, 0.0) ** w for v, w in zip(vals, weights)]))
    return float(np.mean(per_channel))


def test_ms_ssim_matches_numpy_reference() -> None:
    x, y = _pair(n=2, h=176, w=192, noise=0.1)
    got = ms_ssim(x, y, reduction="none")
    for i in range(2):
        ref = _ms_ssim_reference(_np(x, i), _np(y, i))
        assert 0.3 < ref < 0.99
        assert float(got[i]) == pytest.approx(ref, abs=5e-5)
    assert float(ms_ssim(y, y)) == pytest.approx(1.0, abs=1e-5)


def test_rgb_to_y_matches_skimage() -> None:
    _, y = _pair(n=1)
    ours = rgb_to_y(y.double())[0, 0].numpy()
    ref = rgb2ycbcr(_np(y, 0))[..., 0] / 255.0
    np.testing.assert_allclose(ours, ref, atol=1e-12)
    assert ours.min() >= 16 / 255 - 1e-9
    assert ours.max() <= 235 / 255 + 1e-9


def test_identical_images_psnr_is_capped_and_ssim_is_one() -> None:
    _, y = _pair(n=2)
    assert torch.allclose(psnr(y, y, reduction="none"), torch.full((2,), 80.0, dtype=torch.float64))
    assert float(ssim(y, y)) == pytest.approx(1.0, abs=1e-6)


def test_per_image_scores_do_not_depend_on_batch() -> None:
    x, y = _pair(n=4)
    for cls in (PSNR, SSIM):
        m = cls(MetricSettings())
        whole = m(x, y)
        single = torch.cat([m(x[i : i + 1], y[i : i + 1]) for i in range(4)])
        assert torch.allclose(whole, single, atol=1e-6)
    assert float(psnr(x, y, reduction="sum")) == pytest.approx(float(psnr(x, y, reduction="none").sum()))


def test_registry_and_classes() -> None:
    assert set(METRICS.names()) == {"psnr", "ssim", "ms_ssim"}
    m = build_metric("ssim", MetricSettings(crop_border=2, color_space="y"))
    assert isinstance(m, SSIM)
    assert "border crop 2 px" in repr(m)
    assert "Y (BT.601" in repr(m)
    with pytest.raises(EvaluationError, match="unknown image metric"):
        build_metric("lpips")


@pytest.mark.parametrize(
    ("x", "y", "match"),
    [
        (torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 30), "differ in shape"),
        (torch.rand(1, 3, 32, 32) * 2, torch.rand(1, 3, 32, 32), r"span \[.*data_range is 1"),
        (torch.full((1, 3, 32, 32), float("nan")), torch.rand(1, 3, 32, 32), "NaN"),
        (torch.rand(3, 32, 32), torch.rand(3, 32, 32), r"\(N, C, H, W\)"),
    ],
)
def test_bad_inputs_raise_clear_errors(x: torch.Tensor, y: torch.Tensor, match: str) -> None:
    with pytest.raises(EvaluationError, match=match):
        psnr(x, y)


def test_size_limits() -> None:
    x, y = _pair(n=1, h=64, w=64)
    with pytest.raises(EvaluationError, match="MS-SSIM needs images of at least 161 px"):
        MSSSIM(MetricSettings())(x, y)
    with pytest.raises(EvaluationError, match="after a 40-px border crop, got 64x64"):
        psnr(x, y, crop_border=40)
    with pytest.raises(ValueError, match="odd"):
        MetricSettings(ssim_kernel_size=10)
    # values a hair above the data range (float rounding in a model) are clamped, not refused
    assert torch.isfinite(psnr(x.clamp(0, 1) + 5e-5, y))


def test_aggregator_exact_statistics() -> None:
    rng = np.random.default_rng(3)
    vals = rng.normal(25, 3, size=200)
    agg = ScoreAggregator("psnr", capacity=1000)
    for start in range(0, 200, 7):
        chunk = vals[start : start + 7]
        agg.add(torch.from_numpy(chunk), [f"im{start + i}" for i in range(len(chunk))])
    s = agg.summary(n_resamples=500, seed=1)
    assert s.n == 200
    assert s.exact
    assert s.mean == pytest.approx(vals.mean(), rel=1e-12)
    assert s.std == pytest.approx(vals.std(ddof=1), rel=1e-9)
    q1, med, q3 = np.percentile(vals, [25, 50, 75])
    assert (s.q1, s.median, s.q3) == pytest.approx((q1, med, q3))
    assert s.iqr == pytest.approx(q3 - q1)
    assert s.ci_low < vals.mean() < s.ci_high
    per = agg.per_image()
    assert per is not None
    assert len(per) == 200
    assert per["im13"] == pytest.approx(vals[13])
    with pytest.raises(EvaluationError, match="scored twice"):
        agg.add([1.0], ["im13"])


def test_aggregator_constant_memory_over_capacity() -> None:
    rng = np.random.default_rng(4)
    vals = rng.uniform(0, 1, size=5000)
    sink = io.StringIO()
    agg = ScoreAggregator("ssim", capacity=256, seed=0, sink=sink)
    agg.add(vals.tolist())
    assert agg.n == 5000
    assert not agg.exact
    assert len(agg.values()) == 256  # the reservoir, not the whole list
    assert agg.per_image() is None
    s = agg.summary(n_resamples=300)
    assert s.mean == pytest.approx(vals.mean(), rel=1e-12)  # running moments stay exact
    assert s.min == pytest.approx(vals.min())
    assert s.max == pytest.approx(vals.max())
    assert not s.exact
    assert abs(s.median - 0.5) < 0.1
    lines = sink.getvalue().splitlines()
    assert len(lines) == 5000
    assert json.loads(lines[10]) == {"metric": "ssim", "image": "10", "value": pytest.approx(vals[10])}
    with pytest.raises(EvaluationError, match="non-finite"):
        agg.add([float("inf")])


def test_score_pairs_streams_mixed_sizes() -> None:
    pairs = []
    for i, (h, w) in enumerate([(48, 64), (64, 48), (40, 40)]):
        x, y = _pair(n=1, h=h, w=w, seed=i)
        pairs.append((f"img{i}", x, y))
    aggs = score_pairs(iter(pairs), ("psnr", "ssim"))
    assert aggs["psnr"].n == 3
    expected = [float(psnr(x, y)) for _, x, y in pairs]
    assert list(aggs["psnr"].per_image().values()) == pytest.approx(expected)
