"""PNG figures for reports (matplotlib, Agg backend); every plotted number comes from ``results.json``.

- :func:`fidelity_curves_figure`: surrogate fidelity to the clean victim vs queries, one line per
  defense x strategy, with the bootstrap CI as error bars and the target as a dashed line.
- :func:`pareto_figure`: defenses of one victim in (utility cost, attack degradation), front joined.
- :func:`attacker_pareto_figure`: perturbation defenses of one victim in (honest-user PSNR, attacker
  fidelity loss), one series per attacker (plain, adaptive), each front joined.
- :func:`score_distribution_figure`: per-image scores of the A/B/C cells as box plots with points.
- :func:`image_grid_figure`: sample images side by side (e.g. input | victim | defended | surrogate).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import NullLocator

from evaluation.results import ExtractionTestSet, FidelityCurve, ImageGrid, ParetoFront
from translators.codecs import read_image
from translators.errors import ImageError
from translators.files import atomic_path

DPI = 110


def save_figure(fig: plt.Figure, path: Path, dpi: int = DPI) -> Path:
    """Save ``fig`` to ``path`` atomically (a reader never sees half a PNG) and close it. Returns the path."""
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=dpi, bbox_inches="tight", facecolor="white")
    finally:
        plt.close(fig)
    return path




def fidelity_curves_figure(
    curves: Sequence[FidelityCurve], victim: str, path: Path, target: float | None = None, unit: str = "dB"
) -> Path:
    """Fidelity (y) vs queries used (x, log scale when they span >= 10x) for one victim."""
    fig, ax = plt.subplots(figsize=(7.0, 4.2))
    xs_all: list[float] = []
    for c in curves:
        xs = np.array([p.queries for p in c.points], dtype=float)
        ys = np.array([p.value for p in c.points], dtype=float)
        lo = np.array([p.value - p.ci_low if p.ci_low is not None else 0.0 for p in c.points])
        hi = np.array([p.ci_high - p.value if p.ci_high is not None else 0.0 for p in c.points])
        style = "-" if c.defense == "none" else "--"
        ax.errorbar(xs, ys, yerr=np.vstack([lo, hi]), fmt="o" + style, capsize=3, lw=1.6, ms=5,
                    label=f"{c.defense} / {c.strategy}")
        xs_all.extend(xs.tolist())
    if target is not None:
        ax.axhline(target, color="0.3", ls=":", lw=1.2, label=f"target {target:g} {unit}")
    if xs_all and max(xs_all) >= 10 * max(min(xs_all), 1):
        ax.set_xscale("log")
    if xs_all:  # the measured query counts as plain numbers, not 4x10^0
        ticks = sorted(set(xs_all))
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.xaxis.set_minor_locator(NullLocator())
    metric = curves[0].metric.upper() if curves else "PSNR"
    ax.set_xlabel("queries used by the attacker")
    ax.set_ylabel(f"{metric} of surrogate vs clean victim ({unit})")
    ax.set_title(f"{victim}: attack fidelity vs queries\n(mean over benchmark images, 95% CI; higher = better copy)",
                 fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, title="defense / strategy", title_fontsize=8, loc="best")
    return save_figure(fig, path)


def pareto_figure(front: ParetoFront, path: Path, missing: Sequence[str] = ()) -> Path:
    """Utility cost (x, lower is better) vs attack degradation (y, higher is better) per defense.

    ``missing`` names defenses without a point (no finished cell at the front's budget); they are listed.
    """
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for label, (x, y) in front.points.items():
        on = label in front.front
        ax.scatter([x], [y], s=60 if on else 36, marker="o" if on else "x", color="C3" if on else "C0", zorder=3)
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    if len(front.front) > 1:
        fx = [front.points[k][0] for k in front.front]
        fy = [front.points[k][1] for k in front.front]
        ax.plot(fx, fy, color="C3", lw=1.2, zorder=2, label="Pareto front")
        ax.legend(fontsize=8, loc="best")
    ax.axhline(0, color="0.6", lw=0.8)
    ax.axvline(0, color="0.6", lw=0.8)
    ax.set_xlabel("utility cost: victim PSNR lost vs ground truth (dB), lower is better")
    ax.set_ylabel(f"attack degradation at {front.budget} queries (dB), higher is better")
    strategy = f", strategy {front.strategy}" if front.strategy else ""
    ax.set_title(f"{front.victim}: defenses (red = Pareto-optimal{strategy})", fontsize=10)
    if missing:
        ax.text(0.01, 0.01, f"no point at {front.budget} queries: {', '.join(missing)}", transform=ax.transAxes,
                fontsize=8, color="0.35", va="bottom")
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def attacker_pareto_figure(
    victim: str,
    budget: int,
    series: dict[str, tuple[dict[str, tuple[float, float]], list[str]]],
    path: Path,
    min_honest_psnr: float | None = None,
) -> Path | None:
    """Honest-user PSNR (x, defended vs clean output, dB; right = cheaper for honest users) vs attacker
    fidelity loss at ``budget`` queries (y, dB vs the same attacker undefended; up = better defense).

    ``series``: attacker -> (``{defense: (x, y)}``, Pareto front labels), from
    :func:`evaluation.defense_scoring.attacker_pareto`. None when there is no point at all.
    """
    if not any(pts for pts, _ in series.values()):
        return None
    fig, ax = plt.subplots(figsize=(6.6, 4.6))
    styles = {"plain": ("C0", "o"), "adaptive": ("C3", "s")}
    for i, (who, (pts, front)) in enumerate(series.items()):
        color, marker = styles.get(who, (f"C{i + 4}", "^"))
        xs, ys = [p[0] for p in pts.values()], [p[1] for p in pts.values()]
        ax.scatter(xs, ys, color=color, marker=marker, s=40, zorder=3, label=f"{who} attacker")
        for label, (x, y) in pts.items():
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4 if who == "plain" else -10),
                        fontsize=7, color=color)
        if len(front) > 1:
            ax.plot([pts[k][0] for k in front], [pts[k][1] for k in front], color=color, lw=1.1, ls="--", zorder=2)
    ax.axhline(0, color="0.6", lw=0.8)
    if min_honest_psnr is not None:
        ax.axvline(min_honest_psnr, color="0.4", lw=0.8, ls=":")
        ax.annotate(f"{min_honest_psnr:g} dB", (min_honest_psnr, 0), textcoords="offset points", xytext=(3, 3),
                    fontsize=7, color="0.4")
    ax.set_xlabel("honest-user PSNR: defended vs clean output (dB), right = cheaper")
    ax.set_ylabel(f"attacker fidelity loss at {budget} queries (dB)")
    ax.set_title(f"{victim}: perturbation defenses vs plain and adaptive attackers\n(dashed: Pareto front "
                 "per attacker)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return save_figure(fig, path)


def score_distribution_figure(ts: ExtractionTestSet, metric: str, path: Path) -> Path | None:
    """Box plots of per-image ``metric`` for cells A, B, C of one test set (None if no per-image scores)."""
    data, labels = [], []
    names = {"A": "A victim vs GT", "B": "B surrogate vs victim", "C": "C surrogate vs GT"}
    for cell in ("A", "B", "C"):
        comp = ts.cells.get(cell)  # type: ignore[call-overload]
        m = comp.metrics.get(metric) if comp else None
        if m is None or not m.per_image:
            continue
        data.append(list(m.per_image.values()))
        labels.append(names[cell])
    if not data:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    ax.boxplot(data, tick_labels=labels, showmeans=True)
    rng = np.random.default_rng(0)
    for i, vals in enumerate(data, start=1):
        ax.scatter(i + rng.uniform(-0.08, 0.08, len(vals)), vals, s=12, alpha=0.6, color="C0", zorder=3)
    unit = " (dB)" if metric == "psnr" else ""
    ax.set_ylabel(f"{metric.upper().replace('_', '-')}{unit} per image")
    ax.set_title(f"{ts.name}: per-image {metric.upper().replace('_', '-')} (box: median, IQR; triangle: mean)",
                 fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    return save_figure(fig, path)


def _load(path: Path) -> np.ndarray | None:
    try:
        return read_image(path)[0].permute(1, 2, 0).numpy()
    except (ImageError, OSError):
        return None


def image_grid_figure(grid: ImageGrid, base: Path, path: Path, cell_inches: float = 2.2) -> Path:
    """Rows of sample images (paths relative to ``base``) under column titles; missing files show a note.

    Images are drawn at a common display size, so a small SR input appears enlarged (nearest neighbour).
    """
    rows, cols = len(grid.rows), len(grid.columns)
    fig, axes = plt.subplots(rows, cols, figsize=(cell_inches * cols, cell_inches * rows + 0.4), squeeze=False)
    for r, row in enumerate(grid.rows):
        for c, col in enumerate(grid.columns):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            rel = row.images.get(col)
            img = _load(base / rel) if rel else None
            if img is None:
                ax.text(0.5, 0.5, "missing", ha="center", va="center", fontsize=9, color="0.4")
            else:
                ax.imshow(img, interpolation="nearest")
            if r == 0:
                ax.set_title(col, fontsize=10)
            if c == 0:
                ax.set_ylabel(row.name, fontsize=8)
    fig.suptitle(grid.title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)
