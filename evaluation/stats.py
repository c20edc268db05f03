"""Statistics for score lists: summaries with spread, bootstrap CIs, Welch's t-test and TOST equivalence.

The tests follow the extraction paper (``model-extraction-image-translation-gans``, section 5.4):
Welch's t-test (unequal variances) for a difference between victim and surrogate scores, and the
two one-sided tests (TOST) for *equivalence* within a bound on Cohen's d (default 0.3), where d is the
mean difference over the pooled standard deviation (Cohen 1988). The raw equivalence margin is
``d_bound * pooled_sd``; each one-sided test is a Welch test against that margin (Schuirmann 1987,
as ``statsmodels.stats.weightstats.ttost_ind(..., usevar="unequal")``).

All functions take plain sequences of floats (one score per image) and return pydantic models, so
results serialise straight into ``results.json``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from scipy import stats as sps

from evaluation.errors import EvaluationError

Statistic = Literal["mean", "median"]


class ScoreSummary(BaseModel):
    """Location and spread of one score list.

    ``ci_low``/``ci_high`` bound the ``ci_statistic`` at ``ci_level`` by a percentile bootstrap with
    ``ci_resamples`` resamples (seed ``ci_seed``). ``exact`` is False when the quantiles and CI were
    computed on a uniform reservoir sample because the list outgrew the aggregator's memory cap
    (mean, std, min and max are always exact).
    """

    model_config = ConfigDict(extra="forbid")

    n: int
    mean: float | None = None
    std: float | None = None
    median: float | None = None
    q1: float | None = None
    q3: float | None = None
    iqr: float | None = None
    min: float | None = None
    max: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    ci_level: float = 0.95
    ci_statistic: Statistic = "mean"
    ci_resamples: int = 0
    ci_seed: int = 0
    exact: bool = True


class WelchResult(BaseModel):
    """Welch's two-sample t-test of ``mean_a == mean_b`` (two-sided). ``p_value`` None: not testable."""

    model_config = ConfigDict(extra="forbid")

    n_a: int
    n_b: int
    mean_a: float | None
    mean_b: float | None
    diff: float | None = Field(None, description="mean_a - mean_b")
    t: float | None = None
    df: float | None = None
    p_value: float | None = None
    alpha: float = 0.05
    significant: bool | None = None
    note: str = ""


class TOSTResult(BaseModel):
    """TOST equivalence of two means within ``±d_bound`` pooled standard deviations (Cohen's d).

    ``low``/``high`` are the raw margins (score units). ``equivalent`` is True when both one-sided
    nulls (diff <= low, diff >= high) are rejected at ``alpha``, i.e. ``p_value = max(p_lower,
    p_upper) < alpha``. ``ci_low``/``ci_high`` is the matching ``1 - 2*alpha`` confidence interval of
    the difference (inside [low, high] exactly when equivalent).
    """

    model_config = ConfigDict(extra="forbid")

    n_a: int
    n_b: int
    d_bound: float
    alpha: float
    cohens_d: float | None = None
    pooled_sd: float | None = None
    diff: float | None = None
    low: float | None = None
    high: float | None = None
    t_lower: float | None = None
    p_lower: float | None = None
    t_upper: float | None = None
    p_upper: float | None = None
    df: float | None = None
    p_value: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    equivalent: bool | None = None
    note: str = ""


def _as_array(values: Sequence[float] | np.ndarray, what: str = "scores") -> np.ndarray:
    a = np.asarray(values, dtype=np.float64).ravel()
    if not np.all(np.isfinite(a)):
        raise EvaluationError(f"{what} contain NaN or infinite values; cannot compute statistics")
    return a


def quantiles(values: Sequence[float] | np.ndarray) -> tuple[float, float, float]:
    """``(q1, median, q3)`` with linear interpolation (numpy's default, as ``np.percentile``)."""
    a = _as_array(values)
    if a.size == 0:
        raise EvaluationError("no scores to summarise")
    q1, med, q3 = np.percentile(a, [25.0, 50.0, 75.0])
    return float(q1), float(med), float(q3)


def bootstrap_ci(
    values: Sequence[float] | np.ndarray,
    statistic: Statistic = "mean",
    confidence: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean or median of ``values``.

    Draws ``n_resamples`` resamples with replacement (numpy PCG64 seeded by ``seed``) in chunks so
    memory stays under a few MB whatever ``len(values)``. One value gives the degenerate ``(v, v)``.
    """
    a = _as_array(values)
    if a.size == 0:
        raise EvaluationError("no scores for a bootstrap interval")
    if not 0.0 < confidence < 1.0:
        raise EvaluationError(f"confidence must be in (0, 1), got {confidence}")
    if n_resamples < 1:
        raise EvaluationError(f"n_resamples must be >= 1, got {n_resamples}")
    if a.size == 1:
        return float(a[0]), float(a[0])
    rng = np.random.default_rng(seed)
    chunk = max(1, 2_000_000 // a.size)
    stats_out = np.empty(n_resamples, dtype=np.float64)
    reducer = np.mean if statistic == "mean" else np.median
    for start in range(0, n_resamples, chunk):
        stop = min(n_resamples, start + chunk)
        idx = rng.integers(0, a.size, size=(stop - start, a.size))
        stats_out[start:stop] = reducer(a[idx], axis=1)
    tail = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(stats_out, [tail, 1.0 - tail])
    return float(lo), float(hi)


def summarize(
    values: Sequence[float] | np.ndarray,
    confidence: float = 0.95,
    statistic: Statistic = "mean",
    n_resamples: int = 2000,
    seed: int = 0,
    exact: bool = True,
    mean: float | None = None,
    std: float | None = None,
    vmin: float | None = None,
    vmax: float | None = None,
) -> ScoreSummary:
    """Summary of ``values`` (mean, sample std, median, IQR, min/max and a bootstrap CI).

    ``mean``/``std``/``vmin``/``vmax`` override the values computed from ``values`` (the streaming
    aggregator passes its exact running moments while ``values`` is a reservoir sample).
    """
    a = _as_array(values)
    if a.size == 0:
        return ScoreSummary(n=0, ci_level=confidence, ci_statistic=statistic, exact=exact)
    q1, med, q3 = quantiles(a)
    lo, hi = bootstrap_ci(a, statistic, confidence, n_resamples, seed)
    sd = float(np.std(a, ddof=1)) if a.size > 1 else 0.0
    return ScoreSummary(
        n=int(a.size),
        mean=float(a.mean()) if mean is None else mean,
        std=sd if std is None else std,
        median=med,
        q1=q1,
        q3=q3,
        iqr=q3 - q1,
        min=float(a.min()) if vmin is None else vmin,
        max=float(a.max()) if vmax is None else vmax,
        ci_low=lo,
        ci_high=hi,
        ci_level=confidence,
        ci_statistic=statistic,
        ci_resamples=n_resamples if a.size > 1 else 0,
        ci_seed=seed,
        exact=exact,
    )


def pooled_sd(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> float:
    """Pooled standard deviation ``sqrt(((n_a-1) s_a^2 + (n_b-1) s_b^2) / (n_a + n_b - 2))`` (Cohen's d)."""
    x, y = _as_array(a), _as_array(b)
    if x.size < 2 or y.size < 2:
        raise EvaluationError("the pooled standard deviation needs at least 2 scores per group")
    num = (x.size - 1) * x.var(ddof=1) + (y.size - 1) * y.var(ddof=1)
    return float(math.sqrt(num / (x.size + y.size - 2)))


def cohens_d(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> float:
    """Cohen's d = ``(mean_a - mean_b) / pooled_sd``; ``nan`` when both groups are constant."""
    x, y = _as_array(a), _as_array(b)
    sd = pooled_sd(x, y)
    diff = float(x.mean() - y.mean())
    if sd == 0.0:
        return 0.0 if diff == 0.0 else math.copysign(math.inf, diff)
    return diff / sd


def _welch_se_df(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    va, vb = x.var(ddof=1) / x.size, y.var(ddof=1) / y.size
    se = math.sqrt(va + vb)
    if se == 0.0:
        return 0.0, float("nan")
    df = (va + vb) ** 2 / (va**2 / (x.size - 1) + vb**2 / (y.size - 1))
    return se, float(df)


def welch_ttest(
    a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray, alpha: float = 0.05
) -> WelchResult:
    """Welch's t-test (two-sided) for equal means with unequal variances.

    ``t = (mean_a - mean_b) / sqrt(s_a^2/n_a + s_b^2/n_b)`` with Welch–Satterthwaite degrees of
    freedom. Needs at least 2 scores per group and some variance; otherwise ``p_value`` is None and
    ``note`` says why.
    """
    x, y = _as_array(a), _as_array(b)
    out = WelchResult(
        n_a=int(x.size), n_b=int(y.size), alpha=alpha,
        mean_a=float(x.mean()) if x.size else None, mean_b=float(y.mean()) if y.size else None,
    )
    if x.size < 2 or y.size < 2:
        out.note = "needs at least 2 scores per group"
        return out
    out.diff = float(x.mean() - y.mean())
    se, df = _welch_se_df(x, y)
    if se == 0.0:
        out.note = "both groups are constant; the t statistic is undefined"
        return out
    out.t = out.diff / se
    out.df = df
    out.p_value = float(2.0 * sps.t.sf(abs(out.t), df))
    out.significant = out.p_value < alpha
    return out


def tost_equivalence(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    d_bound: float = 0.3,
    alpha: float = 0.05,
) -> TOSTResult:
    """Two one-sided Welch tests for ``-d_bound*sd_pooled < mean_a - mean_b < d_bound*sd_pooled``.

    Lower test: H0 ``diff <= low``, ``t_lower = (diff - low)/se``, ``p_lower = P(T > t_lower)``.
    Upper test: H0 ``diff >= high``, ``t_upper = (diff - high)/se``, ``p_upper = P(T < t_upper)``.
    ``se`` and ``df`` are Welch's. Equivalence is declared when ``max(p_lower, p_upper) < alpha``.
    """
    if d_bound <= 0:
        raise EvaluationError(f"the equivalence bound (Cohen's d) must be > 0, got {d_bound}")
    if not 0.0 < alpha < 0.5:
        raise EvaluationError(f"alpha must be in (0, 0.5), got {alpha}")
    x, y = _as_array(a), _as_array(b)
    out = TOSTResult(n_a=int(x.size), n_b=int(y.size), d_bound=d_bound, alpha=alpha)
    if x.size < 2 or y.size < 2:
        out.note = "needs at least 2 scores per group"
        return out
    sd = pooled_sd(x, y)
    diff = float(x.mean() - y.mean())
    out.pooled_sd, out.diff = sd, diff
    out.low, out.high = -d_bound * sd, d_bound * sd
    se, df = _welch_se_df(x, y)
    if se == 0.0 or sd == 0.0:
        out.note = "both groups are constant; equivalence cannot be tested"
        return out
    out.cohens_d = diff / sd
    out.df = df
    out.t_lower = (diff - out.low) / se
    out.p_lower = float(sps.t.sf(out.t_lower, df))
    out.t_upper = (diff - out.high) / se
    out.p_upper = float(sps.t.cdf(out.t_upper, df))
    out.p_value = max(out.p_lower, out.p_upper)
    half = float(sps.t.ppf(1.0 - alpha, df)) * se
    out.ci_low, out.ci_high = diff - half, diff + half
    out.equivalent = out.p_value < alpha
    return out
