"""Ownership watermark: the mark's invariances and honest-user cost, and the exactness of the test's null.

The slow end-to-end checks (stolen vs innocent surrogates through the real service, the CLI, URL suspects)
live in tests/test_ownership_verify.py.
"""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats

from defenses import DefenseConfigError, DefenseContext, build_defense, request_rng
from defenses.jpeg import jpeg_roundtrip
from defenses.watermark.ownership import (
    P_FLOOR,
    OwnershipParams,
    OwnershipTest,
    band_features,
    cosine_sf,
    embed,
    feature_source,
    grey_free,
    ownership_key,
    ring_features,
    ring_kernels,
)
from evaluation.metrics import psnr
from translators.corpus import load_images


def _photos(n: int = 4, side: int = 128) -> torch.Tensor:
    ims = [im.image for im in load_images("corpus:benchmark")]
    return torch.cat([ims[i % len(ims)][..., 32 * i : 32 * i + side, 40 : 40 + side] for i in range(n)])


def _q(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(0, 1).mul(255).round().div(255)


def test_ring_features_are_zero_mean_and_commute_with_flips_and_rotations() -> None:
    ker = ring_kernels(3)
    assert ker.shape == (9, 1, 7, 7)  # orbits of D4 on a 7x7 window without the centre
    assert torch.allclose(ker.sum(dim=(1, 2, 3)), torch.zeros(9, dtype=ker.dtype))
    x = torch.rand(1, 3, 40, 40)
    f = ring_features(x, 3)
    for t in (lambda a: a.flip(-1), lambda a: a.flip(-2), lambda a: a.rot90(1, (2, 3)), lambda a: a.transpose(2, 3)):
        assert torch.allclose(ring_features(t(x), 3), t(f), atol=1e-5)


def test_band_features_commute_with_flips_and_rotations() -> None:
    x = torch.rand(1, 3, 48, 48, dtype=torch.float64)
    f = band_features(x, 2)
    assert f.shape == (1, 3 * 2 * 5, 48, 48)  # 3 channels x 2 octaves x 5 tone functions
    for t in (lambda a: a.flip(-1), lambda a: a.rot90(1, (2, 3)), lambda a: a.transpose(2, 3)):
        assert torch.allclose(band_features(t(x), 2), t(f), atol=1e-9)


def test_defense_is_registered_keyed_and_costs_at_most_the_psnr_bound() -> None:
    d = build_defense({"name": "ownership_watermark", "psnr": 40.5})
    x = _photos()
    y = x.flip(1)  # any "clean output"
    ctx = DefenseContext("alice", "r1", "m", "free", request_rng(0), secret=1234)
    marked = d.apply_batch(y, x, [ctx] * len(x))
    assert marked.shape == y.shape
    assert marked.dtype == y.dtype
    assert float(psnr(_q(marked), _q(y), reduction="none").min()) >= 40.0
    again = build_defense({"name": "ownership_watermark", "psnr": 40.5}).apply(y[:1], x[:1], ctx)
    assert torch.equal(again, marked[:1])  # same secret, same key, same mark for every client
    other = d.apply(y[:1], x[:1], DefenseContext("alice", "r1", "m", "free", request_rng(0), secret=99))
    assert not torch.equal(other, marked[:1])
    with pytest.raises(DefenseConfigError, match="radius"):
        build_defense({"name": "ownership_watermark", "radius": 0.5})
    with pytest.raises(DefenseConfigError):
        build_defense({"name": "ownership_watermark", "strength": 3})


def test_key_is_grey_free_and_deterministic() -> None:
    k = ownership_key(7, "k1", 2)
    assert torch.equal(k, ownership_key(7, "k1", 2))
    assert not torch.equal(k, ownership_key(7, "k2", 2))
    assert torch.allclose(grey_free(k), k)


def _calibration_z(residual_fn: object, n_keys: int = 400) -> list[float]:
    """z of one fixed suspect for ``n_keys`` independent keys: exactly N(0, 1) under H0."""
    x = _photos(2, 96)
    clean = x.flip(1)
    t = OwnershipTest(ownership_key(0, "k1", 2), 2)
    for i in range(len(x)):
        t.add(clean[i : i + 1], _q(residual_fn(clean[i : i + 1], x[i : i + 1])),  # type: ignore[operator]
              basis=feature_source(clean[i : i + 1], x[i : i + 1], "input"))
    return [t.z_for(ownership_key(s, "k1", 2)) for s in range(1, n_keys + 1)]


@pytest.mark.parametrize("name", ["blur", "sharpen-grey", "colour-filter"])
def test_null_is_exactly_standard_normal_for_suspects_that_correlate_with_high_pass_filters(name: str) -> None:
    """The random-key null the pilot found uncalibrated is exact here: z over keys is N(0, 1) even for a
    suspect whose residual is a strong fixed filter of the input (the typical innocent-surrogate error)."""
    g = torch.Generator().manual_seed(3)
    fixed = torch.randn(3, 3, 5, 5, generator=g) * 0.05

    def suspect(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if name == "blur":
            return torch.nn.functional.avg_pool2d(y, 3, 1, 1, count_include_pad=False)
        if name == "sharpen-grey":
            return y + 0.5 * (y - torch.nn.functional.avg_pool2d(y, 5, 1, 2, count_include_pad=False))
        return y + torch.nn.functional.conv2d(x, fixed, padding=2)

    z = _calibration_z(suspect)
    ks = stats.kstest(z, "norm")
    assert ks.pvalue > 1e-3, (name, ks)
    assert abs(sum(z) / len(z)) < 0.2
    assert sum(1 for v in z if 0.5 * math.erfc(v / math.sqrt(2)) < 0.01) <= 12  # ~4 expected of 400
    # the test's own p-value (the cosine's exact null) is uniform over keys: the false-claim rate is alpha
    dim = OwnershipTest(ownership_key(0, "k1", 2), 2).key_dim
    p = [cosine_sf(v / float(ownership_key(s, "k1", 2).norm()), dim) for s, v in enumerate(z, start=1)]
    ks_p = stats.kstest(p, "uniform")
    assert ks_p.pvalue > 1e-3, (name, ks_p)
    assert sum(1 for v in p if v < 0.01) <= 12


def test_cosine_null_is_exact() -> None:
    """``cosine_sf``: uniform on [-1, 1] in 3 dimensions (Archimedes), the normal tail of ``t sqrt(d)`` for
    large ``d``, and the tail of simulated uniform directions in the key's 40 dimensions."""
    for t in (-0.9, -0.2, 0.0, 0.4, 0.95):
        assert cosine_sf(t, 3) == pytest.approx((1 - t) / 2, abs=1e-12)
    for z in (1.0, 2.0, 3.0):
        assert cosine_sf(z / math.sqrt(40_000), 40_000) == pytest.approx(0.5 * math.erfc(z / math.sqrt(2)), rel=0.01)
    g = torch.Generator().manual_seed(0)
    k = torch.randn(200_000, 40, generator=g, dtype=torch.float64)
    cos = (k[:, 0] / k.norm(dim=1)).numpy()
    for t in (0.1, 0.3, 0.5):
        assert cosine_sf(t, 40) == pytest.approx(float((cos >= t).mean()), rel=0.05, abs=2e-5)
    assert cosine_sf(1.0, 40) == P_FLOOR
    assert cosine_sf(-1.0, 40) == 1.0
    with pytest.raises(ValueError, match="dim"):
        cosine_sf(0.5, 1)


@pytest.mark.parametrize("carrier", ["ring", "band"])
def test_a_suspect_reproducing_the_mark_is_caught_and_the_clean_victim_is_not(carrier: str) -> None:
    p = OwnershipParams(carrier=carrier, radius=2)
    key = ownership_key(5, p.key_id, p.radius, p.carrier)
    assert not torch.equal(key.flatten()[:10], ownership_key(5, p.key_id, p.radius, "ring" if carrier == "band"
                                                             else "band").flatten()[:10])
    x = _photos(4, 128)
    y = x.flip(1)
    marked = _q(embed(y, key, p, x))
    assert float(psnr(marked, _q(y), reduction="none").min()) >= 40.0
    t_marked = OwnershipTest(key, p.radius, p.carrier)
    t_clean = OwnershipTest(key, p.radius, p.carrier)
    for i in range(len(x)):
        b = feature_source(y[i : i + 1], x[i : i + 1], p.source)
        t_marked.add(y[i : i + 1], marked[i : i + 1], basis=b)
        t_clean.add(y[i : i + 1], _q(y[i : i + 1]), basis=b)
    res = t_marked.result()
    assert res["alpha"] > 0  # the estimate points along the key
    assert res["off_key"] < res["alpha"]
    assert res["p_value"] < 1e-6
    # a perfect copy reaches (almost) the ceiling |k|; the band carrier's 8-bit-rounded, lower-gain mark on
    # 4 probes, less (its 30 tone-modulated features are more collinear)
    assert res["z"] > (0.8 if carrier == "ring" else 0.65) * res["max_z"]
    assert res["cosine"] == pytest.approx(res["z"] / res["max_z"])
    assert res["statistic"] == "cosine"
    assert t_clean.result()["p_value"] > 0.01


def test_larger_ring_scales_commute_with_flips_and_draw_their_own_key() -> None:
    x = torch.rand(1, 3, 48, 48, dtype=torch.float64)
    f = ring_features(x, 2, scale=3)
    assert f.shape == (1, 15, 48, 48)
    for t in (lambda a: a.flip(-1), lambda a: a.rot90(1, (2, 3)), lambda a: a.transpose(2, 3)):
        assert torch.allclose(ring_features(t(x), 2, scale=3), t(f), atol=1e-9)
    p = OwnershipParams(scales=(4, 1))
    assert p.scales == (1, 4)
    k = ownership_key(5, p.key_id, p.radius, p.carrier, p.scales)
    assert k.shape == (3, 3 * 5 * 2)
    assert torch.allclose(grey_free(k), k)
    assert not torch.equal(k[:, :5], ownership_key(5, p.key_id, p.radius)[:, :5])
    y = _photos(2, 96)
    marked = embed(y, k, p, y.flip(1))
    assert float(psnr(_q(marked), _q(y), reduction="none").min()) >= 40.0
    from defenses.registry import parse_defense_spec

    assert OwnershipParams(**{k: v for k, v in parse_defense_spec("ownership_watermark:scales=4+1").items()
                              if k != "name"}).scales == (1, 4)
    assert OwnershipParams(scales=2).scales == (2,)
    for bad in ((0,), (2, 2), (1, 2, 3, 4, 5), "1+x"):
        with pytest.raises(DefenseConfigError, match="scales"):
            build_defense({"name": "ownership_watermark", "scales": bad})


def _jpeg_test(suspect: torch.Tensor, clean: torch.Tensor, basis: torch.Tensor, key: torch.Tensor,
               nuisance: tuple[int, ...]) -> OwnershipTest:
    t = OwnershipTest(key, 2)
    for i in range(len(clean)):
        c = clean[i : i + 1]
        t.add(c, suspect[i : i + 1], basis=basis[i : i + 1], nuisances=[jpeg_roundtrip(c, q) for q in nuisance])
    return t


def test_projecting_off_the_codecs_own_error_keeps_the_null_exact_and_finds_a_jpeg_thief() -> None:
    """A thief who re-encodes the harvest as JPEG learns the codec's systematic error on top of the mark;
    projecting the error of JPEG-encoded *clean* outputs off the key and the estimate (key-independent, so
    the null stays exact) lets the mark through. Set-up: a perfect denoiser (noisy inputs, clean outputs)."""
    from evaluation.watermark import NUISANCE_JPEG

    g = torch.Generator().manual_seed(0)
    y = _photos(8, 192)
    x = _q(y + 25 / 255 * torch.randn(y.shape, generator=g))
    p = OwnershipParams()
    key = ownership_key(5, p.key_id, p.radius)
    marked = _q(embed(y, key, p, x))
    for q in (75, 90):
        stolen = torch.cat([jpeg_roundtrip(m[None], q) for m in marked])
        plain = _jpeg_test(stolen, y, x, key, ()).result()
        proj = _jpeg_test(stolen, y, x, key, NUISANCE_JPEG).result()
        assert proj["nuisance_dims"] == 3
        assert proj["key_dim"] == plain["key_dim"] - 3
        assert proj["cosine"] > plain["cosine"] + 0.1, (q, plain["cosine"], proj["cosine"])
    # null: an innocent suspect that JPEG-encodes (at a quality not in the nuisance set) and blurs our clean
    # outputs; over 300 independent keys its p-values are uniform
    innocent = torch.cat([jpeg_roundtrip(c[None], 60) for c in
                          torch.nn.functional.avg_pool2d(y, 3, 1, 1, count_include_pad=False)])
    t = _jpeg_test(innocent, y, x, key, NUISANCE_JPEG)
    ps = [t.result(ownership_key(s, "k1", 2))["p_value"] for s in range(1, 301)]
    ks = stats.kstest(ps, "uniform")
    assert ks.pvalue > 1e-3, ks
    assert sum(1 for v in ps if v < 0.01) <= 10
