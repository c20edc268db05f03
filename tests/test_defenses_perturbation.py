"""Perturbation defenses (fmd, feature_amplify, poison): parameters checked at build and set-up, outputs keep
shape and range, stay within eps / the PSNR floor, are deterministic per secret and input, rows of a batch do
not interact, and each moves the quantity it claims to move (features, singular values, proxy gradient)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from defenses import DefenseConfigError, DefenseContext, ModelAccessError, ModelHandle, build_defense, request_rng
from defenses.feature_amplify import amplify_top_singular
from defenses.features import LayerTap, default_feature_layer
from defenses.poison import PoisonDefense, proxy_path, synthetic_images
from evaluation.metrics import psnr
from translators.archs.registry import build_arch
from translators.checkpoint import load_model

torch.set_num_threads(1)

SR_KW = {"scale": 4, "channels": 8, "n_blocks": 1}
DN_KW = {"channels": 8, "depth": 3}


def handle(arch: str = "dncnn", kind: str = "safetensors", seed: int = 0) -> ModelHandle:
    torch.manual_seed(seed)
    kwargs = SR_KW if arch == "srresnet" else DN_KW
    module = build_arch(arch, kwargs).eval()
    if kind == "torchscript":
        module = torch.jit.script(module)
    scale = 4 if arch == "srresnet" else 1
    return ModelHandle(name=arch, module=module, device=torch.device("cpu"), card={"arch": arch, "kwargs": kwargs},
                       kind=kind, task="sr" if scale > 1 else "denoise", scale=scale)


def ctx(i: int = 0, secret: int = 99, digest: str | None = None) -> DefenseContext:
    return DefenseContext(client_id="c", request_id=f"r{i}", model="m", tier="t", rng=request_rng(1000 + i),
                          input_sha256=digest if digest is not None else f"{i:064x}", secret=secret)


def run(d: object, y: torch.Tensor, x: torch.Tensor, ctxs: list[DefenseContext]) -> torch.Tensor:
    grad = torch.enable_grad() if d.requires_grad else torch.no_grad()  # type: ignore[attr-defined]
    with grad:
        return d.apply_batch(y, x, ctxs)  # type: ignore[attr-defined]


def victim_io(h: ModelHandle, n: int = 3, side: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    x = synthetic_images(n, side, torch.Generator().manual_seed(5))
    with torch.no_grad():
        y = h.module(x).clamp(0, 1)
    return x, y


# ---------------------------------------------------------------------------------------------- parameters


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ({"name": "fmd", "eps": 0.0}, "eps"),
        ({"name": "fmd", "eps": -0.1}, "eps"),
        ({"name": "fmd", "steps": 0}, "steps"),
        ({"name": "fmd", "eps": 0.01, "alpha": 0.02}, "alpha must be in"),
        ({"name": "fmd", "feature": "torchvision", "layer": "features.3"}, "weights"),
        ({"name": "fmd", "feature": "torchvision", "arch": "vit_h_14", "weights": "w", "layer": "x"}, "arch"),
        ({"name": "feature_amplify", "h": 1.0}, "h"),
        ({"name": "feature_amplify", "k": 0}, "k"),
        ({"name": "poison", "psnr": 10}, "psnr"),
    ],
)
def test_invalid_parameters_are_rejected_at_build_with_the_range(spec: dict[str, object], match: str) -> None:
    with pytest.raises(DefenseConfigError, match=match):
        build_defense(spec)


def test_setup_refuses_unknown_layers_opaque_models_and_missing_feature_weights(tmp_path: Path) -> None:
    with pytest.raises(ModelAccessError, match=r"unknown layer 'nope'; valid layers: body, body\.0"):
        build_defense({"name": "fmd", "layer": "nope"}).setup(torch.device("cpu"), handle())
    with pytest.raises(ModelAccessError, match="unknown layer 'nope'"):
        build_defense({"name": "feature_amplify", "layer": "nope"}).setup(torch.device("cpu"), handle())
    for name in ("fmd", "feature_amplify"):
        with pytest.raises(ModelAccessError, match=r"torchscript file; serve it from a \.safetensors"):
            build_defense({"name": name}).setup(torch.device("cpu"), handle(kind="torchscript"))
    missing = tmp_path / "squeeze.safetensors"
    d = build_defense({"name": "fmd", "feature": "torchvision", "arch": "squeezenet1_1", "weights": str(missing),
                       "layer": "features.3"})
    with pytest.raises(ModelAccessError, match=r"squeeze\.safetensors' not found; write the state dict"):
        d.setup(torch.device("cpu"), handle())


# ---------------------------------------------------------------------------------------------- fmd


@pytest.mark.parametrize("arch", ["dncnn", "srresnet"])
def test_fmd_stays_in_the_eps_ball_is_deterministic_and_distorts_features_more_than_random(arch: str) -> None:
    h = handle(arch)
    x, y = victim_io(h)
    d = build_defense({"name": "fmd"})
    d.setup(torch.device("cpu"), h)
    ctxs = [ctx(i) for i in range(3)]
    z = run(d, y, x, ctxs)
    eps = d.params.eps  # type: ignore[attr-defined]
    assert z.shape == y.shape
    assert z.dtype == y.dtype
    assert z.min().item() >= 0.0
    assert z.max().item() <= 1.0
    assert (z - y).abs().max().item() <= eps + 1e-6
    assert psnr(z, y, data_range=1.0).min().item() >= 40.0, "default eps 2/255 keeps honest PSNR >= 40 dB"
    assert torch.equal(z, run(d, y, x, ctxs)), "same secret and inputs: same output"
    assert not torch.equal(z, run(d, y, x, [ctx(i, secret=7) for i in range(3)])), "keyed by the server secret"
    one = run(d, y[1:2], x[1:2], [ctxs[1]])
    assert torch.allclose(one, z[1:2], atol=1e-6), "a row does not depend on the other requests of its batch"
    # the objective is met: features of z move further than those of random +-eps sign noise
    tap = LayerTap(h.module, default_feature_layer(h.module), "test")
    rnd = (y + eps * torch.sign(torch.randn(y.shape, generator=torch.Generator().manual_seed(0)))).clamp(0, 1)
    with torch.no_grad():
        f0 = tap(y)
        assert F.mse_loss(tap(z), f0) > 1.2 * F.mse_loss(tap(rnd), f0)


def test_fmd_reads_a_torchvision_network_from_a_local_file(tmp_path: Path) -> None:
    import torchvision.models as tvm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    weights = tmp_path / "squeezenet.safetensors"
    save_file({k: v.contiguous() for k, v in tvm.squeezenet1_1(weights=None).state_dict().items()}, str(weights))
    d = build_defense({"name": "fmd", "feature": "torchvision", "arch": "squeezenet1_1", "weights": str(weights),
                       "layer": "features.3", "eps": 3 / 255, "steps": 3})
    d.setup(torch.device("cpu"), None)
    h = handle()
    x, y = victim_io(h, n=2, side=32)
    z = run(d, y, x, [ctx(0), ctx(1)])
    assert (z - y).abs().max().item() <= 3 / 255 + 1e-6
    assert (z - y).abs().mean().item() > 1 / 255
    wrong = tmp_path / "wrong.safetensors"
    save_file({"w": torch.zeros(2)}, str(wrong))
    bad = build_defense({"name": "fmd", "feature": "torchvision", "arch": "squeezenet1_1", "weights": str(wrong),
                         "layer": "features.3"})
    with pytest.raises(ModelAccessError, match="is not a squeezenet1_1 state dict"):
        bad.setup(torch.device("cpu"), None)


# ---------------------------------------------------------------------------------------------- feature_amplify


def test_amplify_top_singular_scales_exactly_the_top_k_singular_values() -> None:
    feat = torch.randn(2, 6, 5, 7, generator=torch.Generator().manual_seed(0))
    out = amplify_top_singular(feat, k=2, h=3.0)
    s0 = torch.linalg.svdvals(feat.reshape(2, 6, -1))
    s1 = torch.linalg.svdvals(out.reshape(2, 6, -1))
    expected = s0.clone()
    expected[:, :2] *= 3.0
    assert torch.allclose(s1.sort(descending=True).values, expected.sort(descending=True).values, atol=1e-4)


@pytest.mark.parametrize("arch", ["dncnn", "srresnet"])
def test_feature_amplify_changes_the_output_deterministically_per_row(arch: str) -> None:
    h = handle(arch)
    x, y = victim_io(h)
    d = build_defense({"name": "feature_amplify", "k": 2, "h": 2.0})
    d.setup(torch.device("cpu"), h)
    z = run(d, y, x, [ctx(i) for i in range(3)])
    assert z.shape == y.shape
    assert z.min().item() >= 0.0
    assert z.max().item() <= 1.0
    assert (z - y).abs().mean().item() > 1e-4, "amplifying a feature map changes the output"
    assert torch.equal(z, run(d, y, x, [ctx(i, secret=5) for i in range(3)])), "no randomness"
    assert torch.allclose(run(d, y[2:], x[2:], [ctx(2)]), z[2:], atol=1e-5)
    with torch.no_grad():
        assert torch.equal(h.module(x).clamp(0, 1), y), "the hook is removed after the defense ran"


# ---------------------------------------------------------------------------------------------- poison


@pytest.mark.parametrize("proxy", ["auto", "resunet"])
def test_poison_sits_on_the_psnr_floor_turns_the_proxy_gradient_and_caches_its_proxy(tmp_path: Path,
                                                                                    proxy: str) -> None:
    h = handle("srresnet")
    x, y = victim_io(h, n=2, side=16)
    spec = {"name": "poison", "psnr": 40.0, "proxy_steps": 30, "proxy_channels": 4, "proxy_side": 8,
            "proxy_dir": str(tmp_path), "proxy": proxy}
    d = build_defense(spec)
    assert isinstance(d, PoisonDefense)
    torch.manual_seed(1234)
    expected = torch.rand(4)
    torch.manual_seed(1234)
    d.setup(torch.device("cpu"), h)  # trains the proxy inside the server: the global generator is left alone
    assert torch.equal(torch.rand(4), expected)
    cached = proxy_path(h, d.params)
    assert cached.exists()
    assert load_model(cached).card.arch == ("srresnet" if proxy == "auto" else "resunet")
    assert cached.with_suffix(".json").exists()
    stamp = cached.stat().st_mtime_ns
    z = run(d, y, x, [ctx(0), ctx(1)])
    assert z.shape == y.shape
    assert z.min().item() >= 0.0
    assert z.max().item() <= 1.0
    p = psnr(z, y, data_range=1.0)
    assert p.min().item() >= 40.0 - 1e-3
    assert p.max().item() < 41.0
    again = build_defense(spec)
    again.setup(torch.device("cpu"), h)
    assert cached.stat().st_mtime_ns == stamp, "the cached proxy is loaded, not retrained"
    assert torch.equal(run(again, y, x, [ctx(0), ctx(1)]), z), "deterministic per input"

    # the proxy's parameter gradient turns away from the clean one more than for random noise of equal RMS
    proxy = d.proxy
    assert proxy is not None

    def grad(target: torch.Tensor) -> torch.Tensor:
        proxy.zero_grad()
        with torch.enable_grad():
            (proxy(x) - target).pow(2).sum().backward()
        return torch.cat([q.grad.flatten() for q in proxy.parameters()])  # type: ignore[union-attr]

    g0 = grad(y)
    delta = z - y
    rnd = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    rnd = (y + rnd * delta.pow(2).mean().sqrt() / rnd.pow(2).mean().sqrt()).clamp(0, 1)
    cos_poison = F.cosine_similarity(grad(z), g0, dim=0).item()
    cos_random = F.cosine_similarity(grad(rnd), g0, dim=0).item()
    assert cos_poison < cos_random - 0.05, (cos_poison, cos_random)


def test_the_perturbation_campaign_file_validates_every_defense() -> None:
    from evaluation.campaign.config import load_campaign

    cfg, _ = load_campaign(Path(__file__).resolve().parents[1] / "configs" / "campaigns" / "perturbation.toml")
    names = {spec["name"] for d in cfg.defenses for spec in d.pipeline}
    assert {"fmd", "feature_amplify", "poison", "jpeg", "noise"} <= names
    assert [v.name for v in cfg.victims] == ["sr4x", "denoise25", "style-teal"]
