"""Welch, TOST, Cohen's d and bootstrap CIs against scipy and statsmodels on fixed data."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps

from evaluation.errors import EvaluationError
from evaluation.stats import (
    bootstrap_ci,
    cohens_d,
    pooled_sd,
    quantiles,
    summarize,
    tost_equivalence,
    welch_ttest,
)

try:
    from statsmodels.stats.weightstats import ttost_ind
except ImportError:  # pragma: no cover - the message is the point
    pytest.fail("statsmodels is missing: pip install 'statsmodels>=0.14' (it is in the dev extra)")

# Per-image PSNR of a victim (A) and a surrogate (C) on 12 and 10 images: fixed data.
VICTIM = np.array([24.1, 25.3, 23.8, 26.0, 24.9, 25.5, 23.2, 24.4, 25.1, 24.7, 26.3, 23.9])
SURROGATE = np.array([23.6, 25.0, 24.2, 25.2, 24.1, 25.9, 22.8, 24.9, 24.6, 23.9])
FAR = SURROGATE - 3.0
# Two large samples from the same distribution: equivalent within d = 0.3.
_RNG = np.random.default_rng(7)
BIG_A, BIG_B = _RNG.normal(24.0, 1.0, 400), _RNG.normal(24.0, 1.0, 380)


@pytest.mark.parametrize("b", [SURROGATE, FAR])
def test_welch_matches_scipy(b: np.ndarray) -> None:
    ours = welch_ttest(VICTIM, b)
    ref = sps.ttest_ind(VICTIM, b, equal_var=False)
    assert ours.t == pytest.approx(ref.statistic, rel=1e-10)
    assert ours.p_value == pytest.approx(ref.pvalue, rel=1e-9)
    assert ours.df == pytest.approx(ref.df, rel=1e-10)
    assert ours.diff == pytest.approx(VICTIM.mean() - b.mean())
    assert ours.significant == (ref.pvalue < 0.05)


def test_welch_detects_a_real_difference_and_not_a_null_one() -> None:
    assert welch_ttest(VICTIM, FAR).significant is True
    assert welch_ttest(VICTIM, SURROGATE).significant is False


@pytest.mark.parametrize(("a", "b", "d_bound", "equivalent"), [
    (VICTIM, SURROGATE, 1.5, True), (VICTIM, SURROGATE, 0.3, False), (VICTIM, FAR, 0.3, False),
    (BIG_A, BIG_B, 0.3, True),
])
def test_tost_matches_statsmodels(a: np.ndarray, b: np.ndarray, d_bound: float, equivalent: bool) -> None:
    ours = tost_equivalence(a, b, d_bound=d_bound, alpha=0.05)
    sd = pooled_sd(a, b)
    p, lower, upper = ttost_ind(a, b, -d_bound * sd, d_bound * sd, usevar="unequal")
    assert ours.low == pytest.approx(-d_bound * sd)
    assert ours.high == pytest.approx(d_bound * sd)
    assert ours.p_value == pytest.approx(p, rel=1e-9)
    assert ours.t_lower == pytest.approx(lower[0], rel=1e-9)
    assert ours.p_lower == pytest.approx(lower[1], rel=1e-9)
    assert ours.t_upper == pytest.approx(upper[0], rel=1e-9)
    assert ours.p_upper == pytest.approx(upper[1], rel=1e-9)
    assert ours.df == pytest.approx(lower[2], rel=1e-9)
    assert ours.equivalent is equivalent
    # the 1 - 2 alpha CI lies inside the margins exactly when TOST declares equivalence
    inside = ours.low < ours.ci_low and ours.ci_high < ours.high
    assert inside is equivalent


def test_cohens_d_and_pooled_sd_by_hand() -> None:
    a, b = np.array([1.0, 2.0, 3.0, 4.0]), np.array([2.0, 4.0, 6.0])
    sp = np.sqrt(((4 - 1) * a.var(ddof=1) + (3 - 1) * b.var(ddof=1)) / (4 + 3 - 2))
    assert pooled_sd(a, b) == pytest.approx(sp)
    assert cohens_d(a, b) == pytest.approx((a.mean() - b.mean()) / sp)
    assert tost_equivalence(a, b).cohens_d == pytest.approx((a.mean() - b.mean()) / sp)


def test_bootstrap_matches_scipy_percentile() -> None:
    rng = np.random.default_rng(11)
    data = rng.gamma(2.0, 2.0, size=60)
    lo, hi = bootstrap_ci(data, "mean", 0.95, n_resamples=20_000, seed=5)
    ref = sps.bootstrap((data,), np.mean, confidence_level=0.95, n_resamples=20_000, method="percentile",
                        random_state=np.random.default_rng(6)).confidence_interval
    se = data.std(ddof=1) / np.sqrt(len(data))
    # different resamples, same estimator: the ends agree to a small fraction of the standard error
    assert lo == pytest.approx(ref.low, abs=0.1 * se)
    assert hi == pytest.approx(ref.high, abs=0.1 * se)
    # reproducible given the seed, and the median variant brackets the median
    assert bootstrap_ci(data, "mean", 0.95, 20_000, 5) == (lo, hi)
    mlo, mhi = bootstrap_ci(data, "median", 0.9, 2000, 0)
    assert mlo <= np.median(data) <= mhi


def test_summary_and_quantiles() -> None:
    s = summarize(VICTIM, n_resamples=1000, seed=2)
    q1, med, q3 = np.percentile(VICTIM, [25, 50, 75])
    assert (s.q1, s.median, s.q3) == pytest.approx((q1, med, q3))
    assert quantiles(VICTIM) == pytest.approx((q1, med, q3))
    assert s.mean == pytest.approx(VICTIM.mean())
    assert s.std == pytest.approx(VICTIM.std(ddof=1))
    assert s.ci_low < s.mean < s.ci_high
    assert s.ci_resamples == 1000
    assert s.exact
    one = summarize([3.5])
    assert one.n == 1
    assert one.ci_low == one.ci_high == 3.5
    assert one.std == 0.0
    assert summarize([]).n == 0


def test_untestable_inputs_say_why() -> None:
    w = welch_ttest([1.0], [1.0, 2.0])
    assert w.p_value is None
    assert "at least 2" in w.note
    t = tost_equivalence([2.0, 2.0], [2.0, 2.0])
    assert t.equivalent is None
    assert "constant" in t.note
    with pytest.raises(EvaluationError, match="NaN"):
        welch_ttest([1.0, float("nan")], [1.0, 2.0])
    with pytest.raises(EvaluationError, match="bound"):
        tost_equivalence(VICTIM, SURROGATE, d_bound=0)
    with pytest.raises(EvaluationError, match="confidence"):
        bootstrap_ci(VICTIM, confidence=1.5)
