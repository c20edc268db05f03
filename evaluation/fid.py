"""FID, KID (with subsets) and NKID on features from a named feature network.

- FID (Heusel et al. 2017): ``||mu_a - mu_b||^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^{1/2})`` with
  sample covariances (``ddof=1``, as pytorch-fid). The trace of the matrix square root is computed as
  ``sum(sqrt(eig(S_a^{1/2} S_b S_a^{1/2})))`` in float64 with symmetric eigendecompositions, which is
  exact for the PSD covariances FID uses and stable when they are rank deficient (fewer images than
  feature dimensions: FID is then biased high and only comparable at equal set sizes).
- KID (Binkowski et al. 2018): unbiased MMD^2 with the cubic polynomial kernel
  ``k(x, y) = (x.y / d + 1)^3``, averaged over ``subsets`` random subsets of ``subset_size`` images
  per side (drawn without replacement, seeded); its std over subsets is reported.
- NKID (``akd-membership-privacy``, section IV): KID normalised by the worst case, the KID of
  all-black images against the same reference, in percent: ``NKID = 100 * KID / KID_black``.

Every result records the :class:`~evaluation.features.FeatureNetworkInfo` that made its features.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict

from evaluation.errors import EvaluationError
from evaluation.features import FeatureNetwork, FeatureNetworkInfo, extract_features


class FIDResult(BaseModel):
    """FID between set ``a`` (e.g. generated) and set ``b`` (reference)."""

    model_config = ConfigDict(extra="forbid")

    value: float
    n_a: int
    n_b: int
    feature_network: FeatureNetworkInfo


class KIDResult(BaseModel):
    """KID mean and std over ``subsets`` subsets of ``subset_size`` images per side."""

    model_config = ConfigDict(extra="forbid")

    mean: float
    std: float
    subsets: int
    subset_size: int
    degree: int = 3
    seed: int = 0
    n_a: int
    n_b: int
    feature_network: FeatureNetworkInfo


class NKIDResult(BaseModel):
    """NKID (percent) = 100 * ``kid.mean`` / ``kid_black.mean``; the same feature network for both."""

    model_config = ConfigDict(extra="forbid")

    nkid_percent: float
    kid: KIDResult
    kid_black: KIDResult
    feature_network: FeatureNetworkInfo


def _features(f: np.ndarray | torch.Tensor, what: str) -> np.ndarray:
    a = f.detach().cpu().numpy() if isinstance(f, torch.Tensor) else np.asarray(f)
    a = a.astype(np.float64, copy=False)
    if a.ndim != 2:
        raise EvaluationError(f"{what} features must be (N, D), got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise EvaluationError(f"{what} features hold NaN or infinite values")
    return a


def _sqrt_psd(m: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((m + m.T) / 2.0)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def _trace_sqrt_product(a: np.ndarray, b: np.ndarray, s_a: np.ndarray, s_b: np.ndarray) -> float:
    """``tr((S_a S_b)^{1/2})`` as a nuclear norm, exactly.

    With any factors ``S_a = F_a^T F_a`` and ``S_b = F_b^T F_b``, the eigenvalues of ``S_a S_b`` are the
    squared singular values of ``F_a F_b^T``, so the trace of the square root is the sum of those
    singular values. Small sets use the centred data (``F = (X - mu) / sqrt(n - 1)``, an
    ``n_a x n_b`` matrix); large ones the symmetric square roots of the ``D x D`` covariances.
    """
    n_a, n_b, d = a.shape[0], b.shape[0], a.shape[1]
    if min(n_a, n_b) <= d:
        f_a = (a - a.mean(0)) / np.sqrt(n_a - 1)
        f_b = (b - b.mean(0)) / np.sqrt(n_b - 1)
        m = f_a @ f_b.T
    else:
        m = _sqrt_psd(s_a) @ _sqrt_psd(s_b)
    return float(np.linalg.svd(m, compute_uv=False).sum())


def frechet_distance(features_a: np.ndarray | torch.Tensor, features_b: np.ndarray | torch.Tensor) -> float:
    """FID of two feature sets ``(N_a, D)`` and ``(N_b, D)``; each needs at least 2 rows."""
    a, b = _features(features_a, "first"), _features(features_b, "second")
    if a.shape[1] != b.shape[1]:
        raise EvaluationError(f"feature dimensions differ: {a.shape[1]} vs {b.shape[1]}")
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise EvaluationError("FID needs at least 2 images per set (it uses covariances)")
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a = np.atleast_2d(np.cov(a, rowvar=False))
    s_b = np.atleast_2d(np.cov(b, rowvar=False))
    tr_covmean = _trace_sqrt_product(a, b, s_a, s_b)
    diff = mu_a - mu_b
    # a squared distance: round-off can push identical sets a hair below 0
    return max(0.0, float(diff @ diff + np.trace(s_a) + np.trace(s_b) - 2.0 * tr_covmean))


def _poly_kernel(x: np.ndarray, y: np.ndarray, degree: int) -> np.ndarray:
    return (x @ y.T / x.shape[1] + 1.0) ** degree


def mmd2_unbiased(x: np.ndarray, y: np.ndarray, degree: int = 3) -> float:
    """Unbiased MMD^2 of two equal-size sets ``(m, D)`` with the polynomial kernel (one KID subset)."""
    m = x.shape[0]
    if m < 2 or y.shape[0] != m:
        raise EvaluationError("an unbiased MMD needs two sets of the same size >= 2")
    kxx, kyy, kxy = _poly_kernel(x, x, degree), _poly_kernel(y, y, degree), _poly_kernel(x, y, degree)
    off = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    return float(off - 2.0 * kxy.sum() / (m * m))


def kid_from_features(
    features_a: np.ndarray | torch.Tensor,
    features_b: np.ndarray | torch.Tensor,
    subsets: int = 100,
    subset_size: int = 1000,
    degree: int = 3,
    seed: int = 0,
) -> tuple[float, float, int]:
    """KID ``(mean, std, subset_size used)`` over ``subsets`` random subsets.

    ``subset_size`` is capped at the smaller set size (reported back). Subsets are drawn without
    replacement with numpy's PCG64 seeded by ``seed``.
    """
    a, b = _features(features_a, "first"), _features(features_b, "second")
    if a.shape[1] != b.shape[1]:
        raise EvaluationError(f"feature dimensions differ: {a.shape[1]} vs {b.shape[1]}")
    if subsets < 1:
        raise EvaluationError(f"KID needs at least one subset, got {subsets}")
    if subset_size < 2:  # the unbiased MMD estimate divides by m - 1
        raise EvaluationError(f"KID subsets need at least 2 images, got a subset size of {subset_size}")
    m = min(subset_size, a.shape[0], b.shape[0])
    if m < 2:
        raise EvaluationError("KID needs at least 2 images per set")
    rng = np.random.default_rng(seed)
    vals = np.empty(subsets)
    for i in range(subsets):
        ia = rng.choice(a.shape[0], m, replace=False)
        ib = rng.choice(b.shape[0], m, replace=False)
        vals[i] = mmd2_unbiased(a[ia], b[ib], degree)
    return float(vals.mean()), float(vals.std(ddof=1)) if subsets > 1 else 0.0, m


def fid_result(
    features_a: np.ndarray, features_b: np.ndarray, info: FeatureNetworkInfo
) -> FIDResult:
    """:func:`frechet_distance` wrapped with set sizes and the feature network."""
    return FIDResult(value=frechet_distance(features_a, features_b), n_a=len(features_a), n_b=len(features_b),
                     feature_network=info)


def kid_result(
    features_a: np.ndarray, features_b: np.ndarray, info: FeatureNetworkInfo, subsets: int = 100,
    subset_size: int = 1000, degree: int = 3, seed: int = 0,
) -> KIDResult:
    """:func:`kid_from_features` wrapped with its settings and the feature network."""
    mean, std, m = kid_from_features(features_a, features_b, subsets, subset_size, degree, seed)
    return KIDResult(mean=mean, std=std, subsets=subsets, subset_size=m, degree=degree, seed=seed,
                     n_a=len(features_a), n_b=len(features_b), feature_network=info)


def black_features(network: FeatureNetwork, like: torch.Tensor, n: int) -> np.ndarray:
    """Features of ``n`` all-black images shaped like one ``(1, 3, H, W)`` image ``like``."""
    one = network(torch.zeros((1, *like.shape[1:]), dtype=torch.float32)).numpy()
    return np.repeat(one, n, axis=0)


def nkid_result(
    generated: np.ndarray, reference: np.ndarray, black: np.ndarray, info: FeatureNetworkInfo,
    subsets: int = 100, subset_size: int = 1000, seed: int = 0,
) -> NKIDResult:
    """NKID (percent) of ``generated`` features against ``reference``, normalised by ``black`` features."""
    kid = kid_result(generated, reference, info, subsets, subset_size, seed=seed)
    kid_black = kid_result(black, reference, info, subsets, subset_size, seed=seed)
    if kid_black.mean <= 0:
        raise EvaluationError("the KID of black images is not positive; NKID is undefined for this reference set")
    return NKIDResult(nkid_percent=100.0 * kid.mean / kid_black.mean, kid=kid, kid_black=kid_black,
                      feature_network=info)


class FID:
    """FID of image sets with a fixed feature network: ``FID(net)(generated, reference) -> FIDResult``.

    Image arguments are iterables of ``(n_i, 3, H_i, W_i)`` batches in [0, 1].
    """

    def __init__(self, network: FeatureNetwork) -> None:
        self.network = network

    def __call__(self, images_a: Iterable[torch.Tensor], images_b: Iterable[torch.Tensor]) -> FIDResult:
        fa, fb = extract_features(self.network, images_a), extract_features(self.network, images_b)
        return fid_result(fa, fb, self.network.info)


class KID:
    """KID of image sets with a fixed feature network and subset settings."""

    def __init__(self, network: FeatureNetwork, subsets: int = 100, subset_size: int = 1000, seed: int = 0) -> None:
        self.network = network
        self.subsets, self.subset_size, self.seed = subsets, subset_size, seed

    def __call__(self, images_a: Iterable[torch.Tensor], images_b: Iterable[torch.Tensor]) -> KIDResult:
        fa, fb = extract_features(self.network, images_a), extract_features(self.network, images_b)
        return kid_result(fa, fb, self.network.info, self.subsets, self.subset_size, seed=self.seed)


def compute_fid(
    network: FeatureNetwork, images_a: Iterable[torch.Tensor], images_b: Iterable[torch.Tensor]
) -> FIDResult:
    """FID between two image streams with ``network``."""
    return FID(network)(images_a, images_b)


def compute_kid(
    network: FeatureNetwork, images_a: Iterable[torch.Tensor], images_b: Iterable[torch.Tensor],
    subsets: int = 100, subset_size: int = 1000, seed: int = 0,
) -> KIDResult:
    """KID between two image streams with ``network``."""
    return KID(network, subsets, subset_size, seed)(images_a, images_b)


def compute_nkid(
    network: FeatureNetwork, generated: list[torch.Tensor], reference: Iterable[torch.Tensor],
    subsets: int = 100, subset_size: int = 1000, seed: int = 0,
) -> NKIDResult:
    """NKID of ``generated`` images against ``reference``; black images shaped like the first generated one."""
    if not generated:
        raise EvaluationError("no generated images for NKID")
    fg = extract_features(network, generated)
    fr = extract_features(network, reference)
    fblack = black_features(network, generated[0][:1], len(fg))
    return nkid_result(fg, fr, fblack, network.info, subsets, subset_size, seed)
