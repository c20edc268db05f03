"""FID/KID/NKID formulas against direct numpy/scipy computations; InceptionV3 weights loading from files."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torchvision.models import inception_v3

from evaluation.errors import EvaluationError, FeatureNetworkError
from evaluation.features import (
    FEATURE_NETWORKS,
    FID_WEIGHTS_FILE,
    FID_WEIGHTS_URL,
    InceptionV3Features,
    build_inception,
    find_inception_weights,
    load_feature_network,
)
from evaluation.fid import (
    compute_fid,
    compute_kid,
    compute_nkid,
    frechet_distance,
    kid_from_features,
    mmd2_unbiased,
)

HEIST = str(Path(sys.executable).with_name("heist"))


def _direct_fid(a: np.ndarray, b: np.ndarray) -> float:
    """FID exactly as written in Heusel et al. 2017, with scipy's matrix square root."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real)


def _feats(n: int, d: int, seed: int, shift: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d, d)) / np.sqrt(d)
    return rng.normal(size=(n, d)) @ mix + shift


@pytest.mark.parametrize(("n", "d"), [(200, 8), (64, 32)])
def test_fid_matches_direct_scipy(n: int, d: int) -> None:
    a, b = _feats(n, d, 0), _feats(n + 10, d, 1, shift=0.5)
    ours, ref = frechet_distance(a, b), _direct_fid(a, b)
    assert ref > 1.0
    assert ours == pytest.approx(ref, rel=1e-8)


def test_fid_rank_deficient_and_identical() -> None:
    a, b = _feats(12, 32, 2), _feats(14, 32, 3, shift=0.2)  # fewer images than dimensions
    assert frechet_distance(a, b) == pytest.approx(_direct_fid(a, b), rel=1e-5)
    assert 0.0 <= frechet_distance(a, a) < 1e-5
    with pytest.raises(EvaluationError, match="at least 2"):
        frechet_distance(a[:1], b)
    with pytest.raises(EvaluationError, match="dimensions differ"):
        frechet_distance(a, b[:, :5])


def _direct_mmd(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with k(u, v) = (u.v / d + 1)^3, written out with loops (Binkowski et al. 2018)."""
    m, d = len(x), x.shape[1]

    def k(u: np.ndarray, v: np.ndarray) -> float:
        return (float(u @ v) / d + 1.0) ** 3

    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


def test_kid_matches_direct_loops() -> None:
    x, y = _feats(9, 5, 4), _feats(9, 5, 5, shift=0.7)
    ref = _direct_mmd(x, y)
    assert mmd2_unbiased(x, y) == pytest.approx(ref, rel=1e-10)
    # one subset of the whole set: the order does not matter, so KID equals the direct estimate
    mean, std, m = kid_from_features(x, y, subsets=1, subset_size=100)
    assert (mean, std, m) == (pytest.approx(ref, rel=1e-10), 0.0, 9)
    # many subsets: each is an unbiased estimate; their mean is close to the full-set value
    mean, std, m = kid_from_features(_feats(300, 5, 6), _feats(300, 5, 7, shift=0.7), subsets=50, subset_size=100)
    full = mmd2_unbiased(_feats(300, 5, 6), _feats(300, 5, 7, shift=0.7))
    assert m == 100
    assert std > 0
    assert mean == pytest.approx(full, abs=3 * std / np.sqrt(50) + 1e-3)
    assert kid_from_features(x, x, subsets=1)[0] < ref
    with pytest.raises(EvaluationError, match="KID subsets need at least 2 images, got a subset size of 1"):
        kid_from_features(x, y, subsets=1, subset_size=1)  # said "2 images per set" of two sets of 9


# --- a real InceptionV3 from a weights file -----------------------------------------------------------------


@pytest.fixture(scope="module")
def tv_weights(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A randomly initialised torchvision inception_v3 state dict saved with torch.save (as users get it)."""
    torch.manual_seed(0)
    net = inception_v3(weights=None, aux_logits=True, init_weights=True)
    state = net.state_dict()
    path = tmp_path_factory.mktemp("weights") / "inception_v3_google-test.pth"
    torch.save(state, path)
    return path, state


@pytest.fixture(scope="module")
def fid_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised FID-Inception (pytorch-fid layout, 1008 classes) as safetensors."""
    torch.manual_seed(1)
    net = build_inception("fid")
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d | torch.nn.Linear):
            torch.nn.init.normal_(m.weight, std=0.05)
    path = tmp_path_factory.mktemp("weights") / "fid_inception.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return path


def _images(n: int, seed: int, h: int = 48, w: int = 40) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, h, w, generator=g)


def test_torchvision_weights_load_and_match_torchvision_forward(
    tv_weights: tuple[Path, dict[str, torch.Tensor]],
) -> None:
    torch.set_num_threads(1)
    path, state = tv_weights
    net = InceptionV3Features(path)
    assert net.info.name == "inception-v3-torchvision"
    assert net.info.weights_file == path.name
    assert len(net.info.weights_sha256 or "") == 64
    assert "inception-v3-torchvision pool3 (2048-d)" in net.info.label
    x = _images(2, 0)
    feats = net(x)
    assert feats.shape == (2, 2048)
    assert feats.dtype == torch.float64
    # independent path: torchvision's own forward with the classifier removed
    ref = inception_v3(weights=None, aux_logits=True, init_weights=False)
    ref.load_state_dict(state)
    ref.fc = torch.nn.Identity()
    ref.eval()
    with torch.no_grad():
        expected = ref(2 * F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) - 1)
    torch.testing.assert_close(feats.float(), expected, rtol=1e-4, atol=1e-5)


def test_fid_variant_from_safetensors_and_results_name_it(fid_weights: Path) -> None:
    torch.set_num_threads(1)
    net = load_feature_network("inception-v3", fid_weights)
    assert net.info.name == "inception-v3-fid"
    a, b = [_images(2, 1)], [_images(2, 2, 40, 48) * 0.5]
    fid = compute_fid(net, a, b)
    assert fid.feature_network.name == "inception-v3-fid"
    assert fid.n_a == fid.n_b == 2
    assert fid.value > 0
    kid = compute_kid(net, a, b, subsets=5, subset_size=3)
    assert kid.feature_network == net.info
    assert kid.subset_size == 2
    nk = compute_nkid(net, a[0].split(1), b, subsets=5, subset_size=2)
    assert nk.nkid_percent == pytest.approx(100 * nk.kid.mean / nk.kid_black.mean)
    assert nk.kid_black.feature_network.name == "inception-v3-fid"
    with pytest.raises(FeatureNetworkError, match="holds fid InceptionV3 weights, but torchvision was asked"):
        load_feature_network("inception-v3-torchvision", fid_weights)


def test_weights_lookup_env_and_cache(
    fid_weights: Path, heist_data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(heist_data_dir / "torch-home"))
    monkeypatch.delenv("HEIST_INCEPTION_WEIGHTS", raising=False)
    with pytest.raises(FeatureNetworkError) as err:
        find_inception_weights()
    msg = str(err.value)
    assert FID_WEIGHTS_URL in msg
    assert "--feature-weights" in msg
    assert "HEIST_INCEPTION_WEIGHTS" in msg
    assert "\n" not in msg
    monkeypatch.setenv("HEIST_INCEPTION_WEIGHTS", str(fid_weights))
    assert find_inception_weights() == fid_weights
    monkeypatch.delenv("HEIST_INCEPTION_WEIGHTS")
    cache = heist_data_dir / "weights"
    cache.mkdir(exist_ok=True)
    shutil.copy(fid_weights, cache / FID_WEIGHTS_FILE)
    try:
        assert find_inception_weights() == cache / FID_WEIGHTS_FILE
    finally:
        (cache / FID_WEIGHTS_FILE).unlink()


def test_untrusted_or_wrong_files_are_refused(tmp_path: Path, tv_weights: tuple[Path, dict]) -> None:
    pickled = tmp_path / "evil.pth"
    torch.save({"fc.weight": torch.zeros(1000, 2048), "payload": Path("/etc/passwd")}, pickled)
    with pytest.raises(FeatureNetworkError, match="never pickled code"):
        InceptionV3Features(pickled)
    wrong = tmp_path / "wrong.pth"
    _, state = tv_weights
    torch.save({k: v for k, v in state.items() if not k.startswith("Mixed_7c")}, wrong)
    with pytest.raises(FeatureNetworkError, match="do not fit InceptionV3"):
        InceptionV3Features(wrong)
    not_inception = tmp_path / "other.safetensors"
    save_file({"conv.weight": torch.zeros(3, 3)}, str(not_inception))
    with pytest.raises(FeatureNetworkError, match="not an InceptionV3 state dict"):
        InceptionV3Features(not_inception)
    with pytest.raises(FeatureNetworkError, match="no such InceptionV3 weights file"):
        InceptionV3Features(tmp_path / "absent.pth")
    assert "inception-v3" in FEATURE_NETWORKS


def test_cli_features_check(tmp_path: Path, fid_weights: Path) -> None:
    env = {**os.environ, "HEIST_DATA_DIR": str(tmp_path), "TORCH_HOME": str(tmp_path / "th")}
    env.pop("HEIST_INCEPTION_WEIGHTS", None)
    ok = subprocess.run([HEIST, "eval", "features", "--feature-weights", str(fid_weights)], capture_output=True,
                        text=True, env=env, timeout=300)  # the option the missing-weights advice names
    assert ok.returncode == 0, ok.stderr
    assert "inception-v3-fid pool3 (2048-d)" in ok.stdout
    bad = subprocess.run([HEIST, "eval", "features"], capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode == 2
    assert "Traceback" not in bad.stderr
    assert FID_WEIGHTS_URL.split("/")[-1] in bad.stderr.replace("\n", "")
    assert "--feature-weights PATH" in " ".join(bad.stderr.split())
