"""Number formatting shared by the Markdown and HTML reports (so both show identical strings).

Precision per quantity: PSNR and FID 2 decimals, SSIM/MS-SSIM 4 decimals, KID 4 significant digits,
p-values 3 significant digits, seconds 1 decimal. Missing values render as an en dash.
"""

from __future__ import annotations

import math

from evaluation.stats import ScoreSummary

DASH = "–"
DECIMALS = {"psnr": 2, "ssim": 4, "ms_ssim": 4, "fid": 2, "db": 2, "seconds": 1, "mb": 1, "percent": 2, "d": 3,
            "t": 3, "df": 1,
            "queries": 0}
METRIC_LABELS = {"psnr": "PSNR (dB)", "ssim": "SSIM", "ms_ssim": "MS-SSIM"}


def num(value: float | int | None, kind: str = "psnr") -> str:
    """``value`` with the precision of ``kind`` (see module doc); integers stay integers."""
    if value is None:
        return DASH
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if kind == "kid":
        return f"{value:.4g}"
    if kind == "p":
        return pvalue(value)
    return f"{value:.{DECIMALS.get(kind, 4)}f}"


def pvalue(p: float | None) -> str:
    """p-values: 3 significant digits, scientific below 0.001."""
    if p is None:
        return DASH
    return f"{p:.3g}" if p >= 1e-3 else f"{p:.2e}"


def mean_ci(s: ScoreSummary | None, kind: str) -> str:
    """``mean [ci_low, ci_high]``."""
    if s is None or s.n == 0:
        return DASH
    return f"{num(s.mean, kind)} [{num(s.ci_low, kind)}, {num(s.ci_high, kind)}]"


def median_iqr(s: ScoreSummary | None, kind: str) -> str:
    """``median (IQR iqr)``."""
    if s is None or s.n == 0:
        return DASH
    return f"{num(s.median, kind)} (IQR {num(s.iqr, kind)})"


def seconds(v: float | None) -> str:
    return DASH if v is None else f"{v:.1f} s"
