"""Architectures: output shapes and ranges, parameter counts, receptive fields, registry errors, TorchScript."""

from __future__ import annotations

import pytest
import torch

from translators.archs import (
    ARCH_REGISTRY,
    DnCNN,
    PatchGANDiscriminator,
    ResnetGenerator,
    SRResNet,
    UNetGenerator,
    build_arch,
    conv_receptive_field,
    count_parameters,
    empirical_receptive_field,
)
from translators.registry import UnknownNameError


def _rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    ("name", "kwargs", "in_hw", "out_hw"),
    [
        ("dncnn", {"channels": 8, "depth": 4}, (17, 23), (17, 23)),
        ("dncnn", {"channels": 8, "depth": 4, "batch_norm": False}, (5, 64), (5, 64)),
        ("unet", {"base": 8, "depth": 4, "max_channels": 32}, (16, 48), (16, 48)),
        ("unet", {"base": 8, "depth": 3, "max_channels": 16, "norm": "instance", "residual": True}, (24, 40), (24, 40)),
        ("unet", {"base": 8, "depth": 2, "norm": "none", "dropout": 0.5}, (12, 8), (12, 8)),
        ("resnet", {"base": 8, "n_blocks": 2}, (20, 36), (20, 36)),
        ("srresnet", {"channels": 8, "n_blocks": 2}, (7, 9), (28, 36)),
        ("srresnet", {"scale": 2, "channels": 8, "n_blocks": 1, "bicubic_skip": False}, (10, 6), (20, 12)),
        ("srresnet", {"scale": 8, "channels": 8, "n_blocks": 1, "batch_norm": True}, (4, 5), (32, 40)),
        ("bicubic_unet", {"scale": 4, "base": 8, "depth": 3}, (5, 7), (20, 28)),
        ("bicubic_unet", {"scale": 1, "base": 8, "depth": 2, "residual": True}, (3, 9), (3, 9)),
        ("resunet", {"base": 8, "levels": 3, "max_channels": 16}, (13, 21), (13, 21)),
        ("resunet", {"scale": 2, "base": 8, "levels": 2, "convs": 1}, (5, 7), (10, 14)),
    ],
)
def test_generator_shapes_and_range(name: str, kwargs: dict[str, object], in_hw: tuple[int, int],
                                    out_hw: tuple[int, int]) -> None:
    model = build_arch(name, kwargs).eval()
    x = _rand(2, 3, *in_hw)
    with torch.no_grad():
        y = model(x)
    assert y.shape == (2, 3, *out_hw)
    assert y.dtype == torch.float32
    assert float(y.min()) >= 0.0
    assert float(y.max()) <= 1.0
    assert model.scale * in_hw[0] == out_hw[0]
    assert in_hw[0] % model.size_multiple == 0


def test_size_multiple_is_what_the_unet_really_needs() -> None:
    model = UNetGenerator(base=8, depth=3, max_channels=16).eval()
    assert model.size_multiple == 8
    with torch.no_grad():
        model(_rand(1, 3, 16, 24))
        with pytest.raises(RuntimeError):
            model(_rand(1, 3, 20, 24))  # 20 is not a multiple of 8: the skip connections do not line up


@pytest.mark.parametrize(("n_layers", "side", "out_side"), [(1, 64, 30), (2, 64, 14), (3, 256, 30)])
def test_patchgan_output_grid(n_layers: int, side: int, out_side: int) -> None:
    """pix2pix's 70x70 PatchGAN maps a 256x256 pair to a 30x30 grid of logits."""
    d = PatchGANDiscriminator(in_ch=6, base=4, n_layers=n_layers).eval()
    with torch.no_grad():
        assert d(_rand(1, 6, side, side)).shape == (1, 1, out_side, out_side)


def test_parameter_counts() -> None:
    # DnCNN (paper config, 17 layers x 64): first conv with bias, 15 BN convs without bias, last conv with bias.
    assert count_parameters(DnCNN()) == (3 * 64 * 9 + 64) + 15 * (64 * 64 * 9 + 2 * 64) + (64 * 3 * 9 + 3) == 558_403
    # CycleGAN resnet_9blocks is 11,378,179 parameters; our InstanceNorms are affine (+2 per channel per norm).
    cyclegan = 9472 + 73856 + 295168 + 9 * 2 * 590080 + 295040 + 73792 + 9411
    affine = 2 * (64 + 128 + 256 + 9 * 2 * 256 + 128 + 64)
    assert count_parameters(ResnetGenerator()) == cyclegan + affine == 11_388_675
    # 70x70 PatchGAN on a 6-channel pair, convs with bias, BatchNorm on the middle three.
    patchgan = (6 * 64 * 16 + 64) + (64 * 128 * 16 + 128 + 256) + (128 * 256 * 16 + 256 + 512) + (
        256 * 512 * 16 + 512 + 1024) + (512 * 16 + 1)
    assert count_parameters(PatchGANDiscriminator()) == patchgan == 2_769_601
    # SRResNet as in Ledig et al. (16 blocks, BN, per-channel PReLU, two x2 pixel shuffles): about 1.55 M.
    assert count_parameters(SRResNet(batch_norm=True)) == 1_550_659
    # A small U-Net, layer by layer: downs 384 + 2080 + 8224, ups 8224 + 4112 + 2064, head 219.
    assert count_parameters(UNetGenerator(base=8, depth=3, max_channels=32)) == 25_307
    frozen = DnCNN(channels=8, depth=3)
    frozen.body[0].weight.requires_grad_(False)
    assert count_parameters(frozen, trainable_only=True) == count_parameters(frozen) - 3 * 8 * 9


@pytest.mark.parametrize("depth", [3, 5, 8])
def test_dncnn_receptive_field_theory_matches_measurement(depth: int) -> None:
    model = DnCNN(channels=8, depth=depth)
    assert model.receptive_field == 2 * depth + 1
    assert conv_receptive_field(model) == model.receptive_field
    assert empirical_receptive_field(model, size=48) == model.receptive_field


@pytest.mark.parametrize(("n_layers", "rf"), [(1, 16), (2, 34), (3, 70)])
def test_patchgan_receptive_field(n_layers: int, rf: int) -> None:
    d = PatchGANDiscriminator(base=4, n_layers=n_layers)
    assert d.receptive_field() == rf
    assert conv_receptive_field(d) == rf
    assert empirical_receptive_field(d, size=128, in_ch=6) == rf


def test_unet_receptive_field_grows_with_depth() -> None:
    rfs = [empirical_receptive_field(UNetGenerator(base=4, depth=d, max_channels=16), size=128) for d in (2, 3, 4)]
    assert rfs[0] < rfs[1] < rfs[2] <= 128


def test_empirical_receptive_field_restores_training_mode() -> None:
    model = DnCNN(channels=4, depth=3).train()
    empirical_receptive_field(model, size=24)
    assert model.training


def test_registry_errors_name_the_problem() -> None:
    assert {"dncnn", "patchgan", "resnet", "srresnet", "unet"} <= set(ARCH_REGISTRY.names())
    with pytest.raises(UnknownNameError, match=r"unknown architecture 'vgg' \(known: .*dncnn, patchgan"):
        build_arch("vgg")
    with pytest.raises(TypeError, match=r"bad arguments for architecture 'unet'.*widht"):
        build_arch("unet", {"widht": 3})
    with pytest.raises(ValueError, match="scale must be 2, 4 or 8"):
        SRResNet(scale=3)
    with pytest.raises(ValueError, match="depth must be >= 2"):
        DnCNN(depth=1)
    with pytest.raises(ValueError, match="unknown norm 'group'"):
        UNetGenerator(norm="group")
    with pytest.raises(ValueError, match="already registered"):
        ARCH_REGISTRY.register("unet")(UNetGenerator)


_TORCHSCRIPT_CASES = [
    ("dncnn", {"channels": 8, "depth": 3}, (12, 12)),
    ("unet", {"base": 8, "depth": 2}, (8, 12)),
    ("resnet", {"base": 8, "n_blocks": 1}, (8, 8)),
    ("srresnet", {"channels": 8, "n_blocks": 1}, (6, 7)),
    ("bicubic_unet", {"scale": 4, "base": 8, "depth": 3}, (5, 6)),
    ("patchgan", {"base": 4}, (64, 64)),
    ("resunet", {"base": 8, "levels": 2, "max_channels": 16}, (9, 11)),
]


def test_torchscript_cases_cover_every_registered_architecture() -> None:
    assert sorted(name for name, _, _ in _TORCHSCRIPT_CASES) == sorted(ARCH_REGISTRY.names())


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
@pytest.mark.parametrize(("name", "kwargs", "hw"), _TORCHSCRIPT_CASES)
def test_every_architecture_compiles_with_torchscript(name: str, kwargs: dict[str, object],
                                                      hw: tuple[int, int]) -> None:
    """``torch.jit.script`` must work so users can export any Heist model as a ``.pt`` the server loads."""
    model = build_arch(name, kwargs).eval()
    scripted = torch.jit.script(model)
    x = _rand(1, 6 if name == "patchgan" else 3, *hw)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x), rtol=0, atol=0)


def test_resunet_starts_at_the_trivial_baseline() -> None:
    """Zero-initialised last conv: an untrained ResUNet is the identity (scale 1) or bicubic (scale 2)."""
    x = _rand(1, 3, 11, 14)
    same = build_arch("resunet", {"base": 8, "levels": 2}).eval()
    torch.testing.assert_close(same(x), x)
    up = build_arch("resunet", {"scale": 2, "base": 8, "levels": 2}).eval()
    bic = torch.nn.functional.interpolate(x, scale_factor=2.0, mode="bicubic", align_corners=False).clamp(0, 1)
    torch.testing.assert_close(up(x), bic)
    pw = build_arch("resunet", {"base": 8, "levels": 2, "pointwise": 2}).eval()
    torch.testing.assert_close(pw(x), x)
    one_by_one = [m for m in pw.pointwise if isinstance(m, torch.nn.Conv2d)]
    assert [(m.in_channels, m.out_channels, m.kernel_size) for m in one_by_one] == [(8, 16, (1, 1)), (16, 16, (1, 1))]
    assert pw.tail.in_channels == 16
