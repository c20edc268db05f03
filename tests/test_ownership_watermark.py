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
from defenses.watermark.carriers import band_features, ring_features, ring_kernels
from defenses.watermark.keyspace import KeySpace, grey_free, reference_gram
from defenses.watermark.ownership import (
    P_FLOOR,
    OwnershipParams,
    OwnershipTest,
    cosine_sf,
    embed,
    feature_source,
    ownership_key,
)
from evaluation.metrics import psnr
from translators.corpus import load_images


def _key(seed: int, key_id: str = "k1", **params: object) -> torch.Tensor:
    return ownership_key(seed, OwnershipParams(key_id=key_id, **params))  # type: ignore[arg-type]


def _space(**params: object) -> KeySpace:
    return OwnershipParams(**params).key_space()  # type: ignore[arg-type]


def _photos(n: int = 4, side: int = 128) -> torch.Tensor:
    ims = [im.image for im in load_images("corpus:benchmark")]
    return torch.cat([ims[i % len(ims)][..., 32 * i : 32 * i + side, 40 : 40 + side] for i in range(n)])


def _q(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(0, 1).mul(255).round().div(255)


def _denoiser_probes(n: int, side: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A perfect denoiser's probes: clean photos ``y`` and their noisy inputs ``x`` (sigma 25/255, 8-bit)."""
    g = torch.Generator().manual_seed(seed)
    y = _photos(n, side)
    return y, _q(y + 25 / 255 * torch.randn(y.shape, generator=g))


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
    k = _key(7)
    assert torch.equal(k, _key(7))
    assert not torch.equal(k, _key(7, "k2"))
    assert torch.allclose(grey_free(k), k)


def _calibration_z(residual_fn: object, n_keys: int = 400) -> list[float]:
    """z of one fixed suspect for ``n_keys`` independent keys: exactly N(0, 1) under H0."""
    x = _photos(2, 96)
    clean = x.flip(1)
    t = OwnershipTest(_key(0), _space())
    for i in range(len(x)):
        t.add(clean[i : i + 1], _q(residual_fn(clean[i : i + 1], x[i : i + 1])),  # type: ignore[operator]
              basis=feature_source(clean[i : i + 1], x[i : i + 1], "input"))
    return [t.z_for(_key(s)) for s in range(1, n_keys + 1)]


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
    dim = OwnershipTest(_key(0), _space()).key_dim
    p = [cosine_sf(v / float(_key(s).norm()), dim) for s, v in enumerate(z, start=1)]
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
    key = ownership_key(5, p)
    assert not torch.equal(key.flatten()[:10], _key(5, carrier="ring" if carrier == "band" else "band",
                                                    radius=2).flatten()[:10])
    x = _photos(4, 128)
    y = x.flip(1)
    marked = _q(embed(y, key, p, x))
    assert float(psnr(marked, _q(y), reduction="none").min()) >= 40.0
    t_marked = OwnershipTest(key, p.key_space())
    t_clean = OwnershipTest(key, p.key_space())
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
    k = ownership_key(5, p)
    assert k.shape == (3, 3 * 5 * 2)
    assert torch.allclose(grey_free(k), k)
    assert not torch.equal(k[:, :5], _key(5)[:, :5])
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
    t = OwnershipTest(key, _space())
    for i in range(len(clean)):
        c = clean[i : i + 1]
        t.add(c, suspect[i : i + 1], basis=basis[i : i + 1], nuisances=[jpeg_roundtrip(c, q) for q in nuisance])
    return t


def test_projecting_off_the_codecs_own_error_keeps_the_null_exact_and_finds_a_jpeg_thief() -> None:
    """A thief who re-encodes the harvest as JPEG learns the codec's systematic error on top of the mark;
    projecting the error of JPEG-encoded *clean* outputs off the key and the estimate (key-independent, so
    the null stays exact) lets the mark through. Set-up: a perfect denoiser (noisy inputs, clean outputs)."""
    from evaluation.watermark import NUISANCE_JPEG

    y, x = _denoiser_probes(8, 192, 0)
    p = OwnershipParams()
    key = ownership_key(5, p)
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
    ps = [t.result(_key(s))["p_value"] for s in range(1, 301)]
    ks = stats.kstest(ps, "uniform")
    assert ks.pvalue > 1e-3, ks
    assert sum(1 for v in ps if v < 0.01) <= 10


def test_luma_key_adds_grey_only_and_its_whitened_coordinates_are_a_standard_gaussian() -> None:
    """``colour = luma``: one filter on every output channel, so the mark is pure grey (luminance); the
    key's test coordinates (whitened by the fixed 1/f reference) are i.i.d. N(0, 1) over keys, which is
    what makes the cosine's null exact."""
    p = OwnershipParams(colour="luma", radius=3, whiten=0.75)
    space = p.key_space()
    assert space.dim() == space.n_feat == 27
    k = ownership_key(5, p)
    assert torch.equal(k[0], k[1])
    assert torch.equal(k[1], k[2])
    assert not torch.equal(k, ownership_key(5, OwnershipParams(colour="luma", radius=3)))
    y = _photos(2, 96)
    x = y.flip(-1)
    mark = embed(y, k, p, x) - y
    inside = ((y > 0.1) & (y < 0.9)).all(1, keepdim=True).expand_as(y)  # away from the clamp
    assert torch.allclose((mark - mark.mean(1, keepdim=True))[inside], torch.zeros(()), atol=1e-6)
    assert float(psnr(_q(y + mark), _q(y), reduction="none").min()) >= 40.0
    coords = torch.stack([space.coords(_key(s, colour="luma", radius=3, whiten=0.75)) for s in range(2000)])
    assert coords.mean(0).abs().max() < 0.1
    cov = coords.T @ coords / len(coords)
    assert (cov - torch.eye(27, dtype=cov.dtype)).abs().max() < 0.15
    g0 = reference_gram(3)
    assert torch.equal(g0, reference_gram.__wrapped__(3))  # a constant of the method
    assert float(torch.trace(g0)) == pytest.approx(27.0)
    with pytest.raises(DefenseConfigError, match="whiten"):
        build_defense({"name": "ownership_watermark", "whiten": 0.5})


def test_luma_and_split_marks_survive_a_jpeg_thief_that_the_rgb_mark_does_not_and_the_null_stays_exact() -> None:
    """JPEG's chroma subsampling removes most of an ``rgb`` mark (its energy is mostly chroma); a ``luma``
    mark keeps most of its energy, and the whitened test weighs directions by their picture energy.
    ``split`` (a chroma part and a luma part, Bonferroni over the two) keeps the luma part's evidence.
    Set-up as above: a perfect denoiser whose thief copies the JPEG 75 of every marked output; the null:
    an innocent suspect that blurs and JPEG-encodes our clean outputs, over 300 independent keys."""
    from evaluation.watermark import NUISANCE_JPEG

    y, x = _denoiser_probes(8, 192, 1)
    blurred = torch.nn.functional.avg_pool2d(y, 3, 1, 1, count_include_pad=False)
    configs = {"rgb": {}, "luma": {"colour": "luma", "radius": 3, "whiten": 0.75},
               "split": {"colour": "split", "radius": 3, "whiten": 0.75}}
    results = {}
    for name, kw in configs.items():
        p = OwnershipParams(**kw)  # type: ignore[arg-type]
        key = ownership_key(5, p)
        marked = _q(embed(y, key, p, x))
        assert float(psnr(marked, _q(y), reduction="none").min()) >= 40.0
        stolen = torch.cat([jpeg_roundtrip(m[None], 75) for m in marked])
        t, copy, innocent = (OwnershipTest(key, p.key_space()) for _ in range(3))
        for i in range(len(y)):
            c, nuis = y[i : i + 1], [jpeg_roundtrip(y[i : i + 1], q) for q in NUISANCE_JPEG]
            t.add(c, stolen[i : i + 1], basis=x[i : i + 1], nuisances=nuis)
            copy.add(c, marked[i : i + 1], basis=x[i : i + 1], nuisances=nuis)
            innocent.add(c, jpeg_roundtrip(blurred[i : i + 1], 60), basis=x[i : i + 1], nuisances=nuis)
        results[name] = t.result()
        assert copy.result()["p_value"] < 1e-12, (name, copy.result())
        if name == "rgb":
            continue
        null = [innocent.result(_key(s, **kw)) for s in range(1, 301)]  # type: ignore[arg-type]
        for part in p.key_space().parts:  # each part's p is exactly uniform
            ps = [r["parts"][part]["p_value"] if "parts" in r else r["p_value"] for r in null]
            assert stats.kstest(ps, "uniform").pvalue > 1e-3, (name, part)
        assert sum(1 for r in null if r["p_value"] < 0.01) <= 10  # Bonferroni: at most the nominal rate
    assert results["luma"]["key_dim"] == 24
    assert results["luma"]["cosine"] > results["rgb"]["cosine"] + 0.15, results
    assert results["luma"]["p_value"] < 1e-3, results
    assert results["split"]["part"] == "luma"
    assert results["split"]["p_value"] < 1e-2, results
    assert set(results["split"]["parts"]) == {"chroma", "luma"}


def test_key_basis_spans_each_parts_test_coordinates() -> None:
    """``KeySpace.basis``: filters whose test coordinates are an orthonormal basis, in which every key's
    coordinates are a standard Gaussian (the fact the kept-directions view relies on)."""
    for space in (_space(), KeySpace(3, colour="luma", whiten=0.75), KeySpace(3, colour="split", whiten=0.75)):
        for part in space.parts:
            b, filters = space.basis(part)
            assert b.shape[1] == len(filters) == space.dim(part)
            assert torch.allclose(b.T @ b, torch.eye(b.shape[1], dtype=b.dtype), atol=1e-10)
            coords = torch.stack([space.coords(f, part) for f in filters], 1)
            assert torch.allclose(coords, b, atol=1e-10)
            key = space.draw(torch.Generator().manual_seed(3))
            k = space.coords(key, part)
            assert torch.allclose(b @ (b.T @ k), k, atol=1e-10)  # the key lies in the span


def test_kept_directions_view_is_exact_under_the_null_and_sharper_on_a_jpeg_copy() -> None:
    """``OwnershipTest(kept=JPEG 75)``: a second cosine on the key directions JPEG keeps. The view's matrix
    depends on the probes and the clean outputs only, so over 300 independent keys an innocent suspect's
    p-values stay uniform; on a thief that copies the JPEG 75 of every marked output, the cosine in the kept
    directions is far higher than on the whole key (the removed directions no longer dilute it). Without a
    distortion the view's matrix is the identity (every singular value 1)."""
    import functools

    from defenses.jpeg import jpeg_phase_average
    from evaluation.watermark import NUISANCE_JPEG

    y, x = _denoiser_probes(4, 96, 1)
    p = OwnershipParams()
    key = ownership_key(5, p)
    marked = _q(embed(y, key, p, x))
    stolen = torch.cat([jpeg_roundtrip(m[None], 75) for m in marked])
    innocent = torch.cat([jpeg_roundtrip(c[None], 60) for c in
                          torch.nn.functional.avg_pool2d(y, 3, 1, 1, count_include_pad=False)])
    kept = functools.partial(jpeg_phase_average, quality=75)
    t, null, ident = (OwnershipTest(key, p.key_space(), kept=k) for k in (kept, kept, lambda v: v))
    for i in range(len(y)):
        c, nuis = y[i : i + 1], [jpeg_roundtrip(y[i : i + 1], q) for q in NUISANCE_JPEG]
        t.add(c, stolen[i : i + 1], basis=x[i : i + 1], nuisances=nuis)
        null.add(c, innocent[i : i + 1], basis=x[i : i + 1], nuisances=nuis)
        if i < 2:
            ident.add(c, stolen[i : i + 1], basis=x[i : i + 1])
    assert ident.result()["kept"]["kept_singular_values"] == pytest.approx([1.0] * 40, abs=1e-6)
    r = t.result()
    assert 2 <= r["kept"]["key_dim"] < r["whole"]["key_dim"]
    assert r["kept"]["cosine"] > r["whole"]["cosine"] + 0.3, r
    assert r["p_value"] == pytest.approx(min(1.0, 2 * min(r["whole"]["p_value"], r["kept"]["p_value"])))
    ps = [null.result(_key(s))["kept"]["p_value"] for s in range(1, 301)]
    assert stats.kstest(ps, "uniform").pvalue > 1e-3
    assert sum(1 for v in ps if v < 0.01) <= 10
