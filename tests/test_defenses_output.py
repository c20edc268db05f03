"""Output defenses: jpeg and noise do what their parameters say, keep shape/range/dtype, plug into the
pipeline in order, and the victim service applies them per model and per tier."""

from __future__ import annotations

import io
import math
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from defenses import (
    DEFENSE_REGISTRY,
    DefenseConfigError,
    DefenseContext,
    DefensePipeline,
    OutputDefense,
    build_defense,
    request_rng,
)
from defenses.jpeg import JpegDefense, jpeg_roundtrip
from defenses.noise import NoiseDefense
from defenses.pipeline import DefenseContractError
from tests.servers import start_victim, tiny_models
from translators.codecs import decode_image, encode_image

torch.set_num_threads(1)


def ctx(request_id: str = "r1", client: str = "alice", digest: str = "d" * 64, seed: int = 7) -> DefenseContext:
    return DefenseContext(client_id=client, request_id=request_id, model="m", tier="free",
                          rng=request_rng(seed), input_sha256=digest, secret=1234)


def photo_like(h: int = 96, w: int = 96, seed: int = 0) -> torch.Tensor:
    """Smooth random image (1, 3, h, w) in [0.2, 0.8]: mid-range, so clamping barely touches added noise."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(1, 3, h // 8, w // 8, generator=g)
    x = torch.nn.functional.interpolate(low, size=(h, w), mode="bicubic", align_corners=False)
    return (0.2 + 0.6 * x.clamp(0, 1)).contiguous()


# ---------------------------------------------------------------------------------------------- registry


def test_registry_builds_from_config_dicts_and_rejects_bad_specs() -> None:
    d = build_defense({"name": "jpeg", "quality": 40})
    assert isinstance(d, JpegDefense)
    assert d.params.quality == 40
    assert d.spec() == {"name": "jpeg", "quality": 40, "subsampling": "4:2:0"}
    assert build_defense(d.spec()).describe() == d.describe() == "jpeg(quality=40,subsampling=4:2:0)"
    assert {"jpeg", "noise"} <= set(DEFENSE_REGISTRY.names())
    with pytest.raises(DefenseConfigError, match=r"unknown defense 'blur'.*jpeg"):
        build_defense({"name": "blur"})
    with pytest.raises(DefenseConfigError, match="quality"):
        build_defense({"name": "jpeg", "quality": 0})
    with pytest.raises(DefenseConfigError, match="colour"):
        build_defense({"name": "noise", "sigma": 0.1, "colour": "red"})
    with pytest.raises(DefenseConfigError, match="kind"):
        build_defense({"name": "noise", "kind": "poisson"})
    with pytest.raises(DefenseConfigError, match="'name'"):
        build_defense({"quality": 3})


# ---------------------------------------------------------------------------------------------- jpeg


def test_jpeg_matches_a_pillow_roundtrip_at_the_quality_and_keeps_shape_range_dtype() -> None:
    x = photo_like(64, 80)
    for q in (10, 50, 95):
        y = JpegDefense(quality=q).apply(x, x, ctx())
        assert y.shape == x.shape
        assert y.dtype == x.dtype
        assert y.min() >= 0.0
        assert y.max() <= 1.0
        arr = (x[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, "JPEG", quality=q)
        ref = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
        got = (y[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        assert np.array_equal(got, ref), f"quality {q}: not the Pillow JPEG round trip"
    err = {q: (JpegDefense(quality=q).apply(x, x, ctx()) - x).abs().mean().item() for q in (5, 30, 90)}
    assert err[5] > err[30] > err[90] > 0.0


def test_jpeg_batch_path_equals_per_image_path() -> None:
    xs = torch.cat([photo_like(seed=s) for s in range(3)])
    d = JpegDefense(quality=30)
    batch = d.apply_batch(xs, xs, [ctx(str(i)) for i in range(3)])
    single = torch.cat([d.apply(xs[i : i + 1], xs[i : i + 1], ctx()) for i in range(3)])
    assert torch.equal(batch, single)


# ---------------------------------------------------------------------------------------------- noise


@pytest.mark.parametrize("kind", ["gaussian", "uniform", "laplace"])
def test_noise_has_the_requested_standard_deviation(kind: str) -> None:
    sigma = 0.03
    x = torch.full((1, 3, 160, 160), 0.5)
    y = NoiseDefense(sigma=sigma, kind=kind).apply(x, x, ctx())
    assert y.shape == x.shape
    assert y.dtype == x.dtype
    assert y.min() >= 0.0
    assert y.max() <= 1.0
    n = (y - x).flatten().double()
    assert abs(n.mean().item()) < 0.002
    assert abs(n.std().item() - sigma) / sigma < 0.03, f"measured sigma {n.std().item():.4f}"
    kurt = (((n - n.mean()) / n.std()) ** 4).mean().item()
    expected = {"gaussian": 3.0, "uniform": 1.8, "laplace": 6.0}[kind]
    assert abs(kurt - expected) < 0.25 * expected, f"{kind}: kurtosis {kurt:.2f}, expected about {expected}"
    if kind == "uniform":
        assert n.abs().max().item() <= sigma * math.sqrt(3) + 1e-6


def test_noise_randomness_per_request_and_per_input() -> None:
    x = photo_like()
    fresh = NoiseDefense(sigma=0.05)
    a = fresh.apply(x, x, ctx("r1", seed=1))
    assert torch.equal(a, fresh.apply(x, x, ctx("r1", seed=1)))  # same seed, same noise
    assert not torch.equal(a, fresh.apply(x, x, ctx("r2", seed=2)))  # every request gets new noise
    sticky = NoiseDefense(sigma=0.05, per_input=True)
    b1 = sticky.apply(x, x, ctx("r1", seed=1))
    b2 = sticky.apply(x, x, ctx("r2", seed=2))
    assert torch.equal(b1, b2), "per_input: repeating a query must give the same output (no averaging gain)"
    assert not torch.equal(b1, sticky.apply(x, x, ctx("r3", client="mallory")))
    assert not torch.equal(b1, sticky.apply(x, x, ctx("r4", digest="e" * 64)))
    # averaging 16 fresh queries cuts the error ~4x; with per_input it does not move
    mean_fresh = torch.stack([fresh.apply(x, x, ctx(str(i), seed=i)) for i in range(16)]).mean(0)
    mean_sticky = torch.stack([sticky.apply(x, x, ctx(str(i), seed=i)) for i in range(16)]).mean(0)
    assert (mean_fresh - x).std() < 0.4 * (a - x).std()
    assert torch.allclose((mean_sticky - x).std(), (b1 - x).std(), rtol=1e-3)


def test_noise_zero_sigma_is_identity() -> None:
    x = photo_like()
    assert torch.equal(NoiseDefense(sigma=0.0).apply(x, x, ctx()), x)


# ---------------------------------------------------------------------------------------------- pipeline


class _Shrink(OutputDefense):
    name = "shrink"

    def apply(self, outputs: torch.Tensor, inputs: torch.Tensor, ctx: DefenseContext) -> torch.Tensor:
        return outputs[..., :-1]


class _Overshoot(OutputDefense):
    name = "overshoot"

    def apply(self, outputs: torch.Tensor, inputs: torch.Tensor, ctx: DefenseContext) -> torch.Tensor:
        return outputs * 3.0 - 1.0


def test_pipeline_runs_in_order_times_each_defense_and_enforces_the_contract() -> None:
    x = photo_like()
    noise_then_jpeg = DefensePipeline([NoiseDefense(sigma=0.05), JpegDefense(quality=60)])
    y, timings = noise_then_jpeg.apply(x, x, [ctx()])
    assert [t.name for t in timings] == ["noise", "jpeg"]
    assert all(t.seconds > 0 for t in timings)
    assert torch.allclose(y * 255, (y * 255).round(), atol=1e-4), "JPEG last: values are k/255"
    jpeg_then_noise = DefensePipeline([JpegDefense(quality=60), NoiseDefense(sigma=0.05)])
    z, _ = jpeg_then_noise.apply(x, x, [ctx()])
    assert not torch.allclose(z * 255, (z * 255).round(), atol=1e-3), "noise last: values are not k/255"
    assert noise_then_jpeg.names == ["noise(sigma=0.05,kind=gaussian,per_input=False)",
                                     "jpeg(quality=60,subsampling=4:2:0)"]
    with pytest.raises(DefenseContractError, match="shrink"):
        DefensePipeline([_Shrink()]).apply(x, x, [ctx()])
    clamped, _ = DefensePipeline([_Overshoot()]).apply(x, x, [ctx()])
    assert clamped.min() >= 0.0
    assert clamped.max() <= 1.0
    empty, timings = DefensePipeline().apply(x, x, [ctx()])
    assert torch.equal(empty, x)
    assert timings == []


def test_default_apply_batch_gives_each_row_its_own_context() -> None:
    xs = torch.full((3, 3, 32, 32), 0.5)
    ys = NoiseDefense(sigma=0.05).apply_batch(xs, xs, [ctx(str(i), seed=i) for i in range(3)])
    assert ys.shape == xs.shape
    assert not torch.equal(ys[0], ys[1])
    assert not torch.equal(ys[1], ys[2])
    one = NoiseDefense(sigma=0.05).apply(xs[1:2], xs[1:2], ctx("1", seed=1))
    assert torch.equal(ys[1:2], one)


def test_jpeg_roundtrip_keeps_device_and_dtype() -> None:
    x = photo_like().double()
    y = jpeg_roundtrip(x, 50)
    assert y.dtype == torch.float64
    assert y.device == x.device
    assert y.shape == x.shape


# ---------------------------------------------------------------------------------------------- in the service


def _png(t: torch.Tensor) -> bytes:
    return encode_image(t, "png")


def test_service_applies_model_then_tier_defenses(tmp_path: Path) -> None:
    models = tiny_models(tmp_path / "m", ("denoise",))
    srv = start_victim(
        tmp_path,
        models=[
            {"name": "plain", "source": str(models["denoise"]), "max_batch": 1},
            {"name": "guarded", "source": str(models["denoise"]), "max_batch": 1,
             "defenses": [{"name": "jpeg", "quality": 20}]},
        ],
        tiers={
            "clean": {"rate": None},
            "noisy": {"rate": None, "defenses": [{"name": "noise", "sigma": 0.05}]},
        },
        keys={"honest": "clean", "suspect": "noisy"},
    )
    try:
        x = photo_like(96, 96, seed=3)
        body = _png(x)
        with srv.client() as c:

            def get(model: str, who: str) -> torch.Tensor:
                r = c.post(f"/v1/models/{model}/translate", content=body,
                           headers={**srv.headers(who), "Content-Type": "image/png"})
                assert r.status_code == 200, r.text
                return decode_image(r.content)

            clean = get("plain", "honest")
            noisy = get("plain", "suspect")
            noisy2 = get("plain", "suspect")
            guarded = get("guarded", "honest")
            guarded_noisy = get("guarded", "suspect")
            log = c.get("/v1/admin/log", params={"limit": 10}, headers=srv.admin_headers).json()
        assert clean.shape == noisy.shape == guarded.shape == (1, 3, 96, 96)
        measured = (noisy - clean).std().item()
        assert abs(measured - 0.05) < 0.004, f"tier noise sigma 0.05 measured as {measured:.4f}"
        assert not torch.equal(noisy, noisy2), "fresh noise per request"
        expected_jpeg = jpeg_roundtrip(clean, 20)
        assert (guarded - expected_jpeg).abs().max().item() <= 1.5 / 255, "model-level JPEG q=20"
        # model defenses first (JPEG), then the tier's noise: the result is not JPEG-quantised noise-free
        assert abs((guarded_noisy - guarded).std().item() - 0.05) < 0.006
        names = {(e["model"], e["client"]): e["defenses"] for e in log}
        assert names[("plain", "honest")] == []
        assert names[("plain", "suspect")] == ["noise(sigma=0.05,kind=gaussian,per_input=False)"]
        assert names[("guarded", "suspect")] == ["jpeg(quality=20,subsampling=4:2:0)",
                                                 "noise(sigma=0.05,kind=gaussian,per_input=False)"]
        m = httpx.get(f"{srv.url}/metrics").text
        assert 'heist_defense_seconds_count{defense="noise",model="plain"} 2.0' in m
        assert 'heist_defense_seconds_count{defense="jpeg",model="guarded"} 2.0' in m
    finally:
        srv.stop()
