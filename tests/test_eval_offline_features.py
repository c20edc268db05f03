"""The offline feature network (``vgg16-random``: VGG16 with seeded random weights, no download) and NKID on
it: identical builds, black images at 100, a set against itself near 0, monotone in added noise, and the
choice order explicit name > InceptionV3 weights found > offline network."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torchvision.models import inception_v3

from evaluation.errors import FeatureNetworkError
from evaluation.features import (
    FEATURE_NETWORKS,
    OFFLINE_NETWORK,
    RandomVGG16Features,
    load_feature_network,
    resolve_feature_network,
)
from evaluation.fid import black_features, compute_nkid, nkid_result
from translators.corpus import load_images, tiles

# the membership utility's KID settings for a 24-image set: 10 subsets of half the set
KW = {"subsets": 10, "subset_size": 12, "seed": 0}


@pytest.fixture(scope="module")
def net() -> RandomVGG16Features:
    return load_feature_network(OFFLINE_NETWORK)  # type: ignore[return-value]


@pytest.fixture(scope="module")
def crops() -> torch.Tensor:
    """24 natural 32 px crops (benchmark split of the offline corpus), ``(24, 3, 32, 32)`` in [0, 1]."""
    imgs = load_images("corpus:benchmark", max_side=128)
    all_crops = torch.cat([t for im in imgs for t in tiles(im.image, 32, 32)])
    pick = torch.randperm(len(all_crops), generator=torch.Generator().manual_seed(0))[:24]
    return all_crops[pick]


def test_two_builds_are_identical_and_leave_the_global_rng_alone(net: RandomVGG16Features,
                                                                  crops: torch.Tensor) -> None:
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    again = RandomVGG16Features(seed=0, input_size=64)
    assert torch.equal(torch.rand(3), before)  # building did not consume the caller's random numbers
    assert again.info == net.info
    assert net.info.weights_sha256
    assert net.info.init_seed == 0
    assert net.info.weights_file is None
    assert "random init seed 0" in net.info.label
    assert net.info.name == "vgg16-random"
    assert not net.info.comparable_with_papers
    f1, f2 = net(crops[:6]), again(crops[:6])
    assert f1.shape == (6, 4096)
    assert f1.dtype == torch.float64
    assert torch.equal(f1, f2)
    other = RandomVGG16Features(seed=1, input_size=64)
    assert other.info.weights_sha256 != net.info.weights_sha256
    assert not torch.allclose(other(crops[:6]), f1)


def test_nkid_black_is_100_self_near_0_and_monotone_in_noise(net: RandomVGG16Features, crops: torch.Tensor) -> None:
    imgs = list(crops.split(1))
    black = compute_nkid(net, [torch.zeros_like(x) for x in imgs], imgs, **KW)  # the whole image path once
    assert black.nkid_percent == pytest.approx(100.0)
    assert black.feature_network == net.info
    ref, blk = net(crops).numpy(), black_features(net, crops[:1], len(crops))
    g = torch.Generator().manual_seed(1)
    values = []
    for sigma in (0.0, 0.1, 0.2, 0.4):
        noisy = net((crops + sigma * torch.randn(crops.shape, generator=g)).clamp(0, 1)).numpy()
        values.append(nkid_result(noisy, ref, blk, net.info, **KW).nkid_percent)
    # a set against itself: 0 up to the unbiased estimator's small-sample error (a few percent of black)
    assert abs(values[0]) < 10, values
    assert all(b > a for a, b in itertools.pairwise(values)), values
    assert values[-1] > 30, values


def test_nkid_from_features_is_scale_consistent(net: RandomVGG16Features, crops: torch.Tensor) -> None:
    """Black features come from one black image repeated; NKID of black against anything is exactly 100."""
    ref = net(crops).numpy()
    blk = black_features(net, crops[:1], len(ref))
    assert np.all(blk == blk[0])
    assert np.any(blk[0] != 0)
    assert nkid_result(blk, ref, blk, net.info, **KW).nkid_percent == pytest.approx(100.0)


def test_choice_order_explicit_then_inception_then_offline(tmp_path, monkeypatch, net: RandomVGG16Features) -> None:
    monkeypatch.delenv("HEIST_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # an empty hub cache
    monkeypatch.setenv("HEIST_DATA_DIR", str(tmp_path / "data"))
    assert resolve_feature_network().info == net.info  # nothing found: offline
    assert resolve_feature_network(fallback="none") is None
    assert resolve_feature_network("none") is None
    assert OFFLINE_NETWORK in FEATURE_NETWORKS
    assert f"{OFFLINE_NETWORK}-224" in FEATURE_NETWORKS
    with pytest.raises(FeatureNetworkError, match="takes no weights"):
        resolve_feature_network(OFFLINE_NETWORK, tmp_path / "w.pth")
    # InceptionV3 weights in the data dir's cache: preferred over the offline network
    w = tmp_path / "data" / "weights" / "inception_v3_google-0cc3c7bd.pth"
    w.parent.mkdir(parents=True)
    torch.manual_seed(0)
    state = {k: v.contiguous() for k, v in inception_v3(weights=None, aux_logits=True, init_weights=False)
             .state_dict().items()}
    torch.save(state, w)
    found = resolve_feature_network()
    assert found is not None
    assert found.info.name == "inception-v3-torchvision"
    assert found.info.comparable_with_papers
    # an explicit name beats the found weights
    assert resolve_feature_network(OFFLINE_NETWORK).info.name == OFFLINE_NETWORK
