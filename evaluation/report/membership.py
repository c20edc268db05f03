"""Report section of ``membership`` cells: table beside the paper's numbers, ROC curves, privacy-utility.

Paper numbers: akd-membership-privacy, Table II (CMP Facades, pix2pix; AUCROC and NKID in percent,
means of five runs). The paper reports no TPR at low FPR and no PSNR.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from evaluation.report.document import Paragraph, Section, Table
from evaluation.report.figures import save_figure
from evaluation.report.format import DASH
from evaluation.results import MembershipCell, Results

# model_defense -> (AUCROC %, NKID %) of Table II (facades). Gauss = output noise.
PAPER_TABLE_II: dict[str, tuple[str, float, float]] = {
    "none": ("Regular training", 96.46, 5.93),
    "gauss": ("Gauss defence", 96.40, 6.49),
    "dpsgd-lo": ("DP-SGD (sigma = 2.02e-3)", 89.20, 8.21),
    "dpsgd-hi": ("DP-SGD (sigma = 1.69e-2)", 58.06, 12.57),
    "dmp": ("DMP", 57.73, 13.64),
    "akd": ("AKD", 57.56, 7.80),
}


def row_key(c: MembershipCell) -> str | None:
    """The paper row a cell matches: its model defense served plainly, or ``gauss`` for the undefended model
    behind an output-noise tier; None for a combination the paper did not run (e.g. DMP + Gauss)."""
    if c.defense == "none":
        return c.model_defense
    return "gauss" if c.model_defense == "none" else None


def _fmt(v: float | None, digits: int = 3) -> str:
    return DASH if v is None else f"{v:.{digits}f}"


def _nkid(u: Any, field: str = "nkid_non_members") -> str:
    """An NKID of ``u`` (non-members by default) with the short name of its network, e.g. ``7.41 (vgg16-random)``."""
    r = getattr(u, field, None) if u is not None else None
    if r is None:
        return DASH
    return f"{r.nkid_percent:.2f} ({r.feature_network.name})"


def _utility_x(u: Any) -> tuple[float, str]:
    """The scatter's utility axis: held-out NKID when measured (the larger set), else non-member NKID, else
    minus non-member PSNR."""
    if u.nkid_heldout is not None:
        return u.nkid_heldout.nkid_percent, f"NKID on {u.heldout_pairs} held-out pairs (%)"
    if u.nkid_non_members is not None:
        return u.nkid_non_members.nkid_percent, "NKID on non-members (%)"
    return -u.psnr_non_members, "- PSNR on non-members (dB, lower = better)"


def _networks(cells: list[MembershipCell]) -> list[Any]:
    """The distinct feature networks that produced the cells' NKIDs (normally one)."""
    seen: dict[str, Any] = {}
    for c in cells:
        if c.utility and c.utility.nkid_non_members:
            info = c.utility.nkid_non_members.feature_network
            seen.setdefault(info.label, info)
    return list(seen.values())


def _roc_figure(cells: list[MembershipCell], path: Path) -> Path:
    """The headline attack's ROC curve of each cell, labelled ``model_defense/defense``."""
    curves = {f"{c.model_defense}/{c.defense}": (s.roc.fpr, s.roc.tpr, s.auc)
              for c in cells if (s := c.headline_scores())}
    return roc_png(curves, path)


def _scatter(cells: list[MembershipCell], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(5, 4))
    labels = set()
    for c in cells:
        s = c.headline_scores()
        if s and c.utility:
            x, label = _utility_x(c.utility)
            labels.add(label)
            ax.scatter([x], [s.auc])
            ax.annotate(f"{c.model_defense}/{c.defense}", (x, s.auc), fontsize=7)
    nets = ", ".join(n.name for n in _networks(cells))
    ax.set_xlabel(" / ".join(sorted(labels)) + (f" [{nets}]" if nets else ""))
    ax.set_ylabel("attack AUC")
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)


def membership_sections(results: Results, builder: Any) -> list[Section]:
    """The membership-inference section: table (ours beside the paper's), ROC per defense, scatter."""
    cells = [c for c in results.membership_cells]
    s = builder.section("Membership inference")
    s.add(Paragraph("Reconstruction-loss attack through the API on members (training pairs) and non-members "
                    "(held-out pairs). AUC and TPR at 0.1% FPR of the headline score (calibrated when a reference "
                    "model was trained); PSNR of the served outputs vs ground truth on non-members. Paper: "
                    "akd-membership-privacy Table II (facades), AUCROC and NKID in percent."))
    rows = []
    heldout = max((c.utility.heldout_pairs for c in cells if c.utility), default=0)
    for c in cells:
        sc = c.headline_scores()
        u = c.utility
        key = row_key(c)
        paper = PAPER_TABLE_II.get(key) if key else None
        rows.append([c.model_defense, c.defense, c.status, sc.score if sc else DASH, _fmt(sc.auc if sc else None),
                     _fmt(sc.tpr_at_fpr.get("0.001") if sc else None),
                     _nkid(u), *([_nkid(u, "nkid_heldout"), _fmt(u.psnr_heldout if u else None, 2)] if heldout else []),
                     _fmt(u.psnr_non_members if u else None, 2), _fmt(u.gap_psnr_db if u else None, 2),
                     f"{paper[1]:.2f}" if paper else DASH, f"{paper[2]:.2f}" if paper else DASH])
    nets = _networks(cells)
    if nets:
        caveat = ("" if all(n.comparable_with_papers for n in nets) else
                  " Not InceptionV3: these NKIDs compare the defenses with each other (each is relative to the same "
                  "network's KID of black images) but are not comparable in absolute value with the paper's "
                  "Inception NKID (docs/privacy.md).")
        s.add(Paragraph("NKID on non-members (100 x KID / KID of black images), features: "
                        + "; ".join(n.label for n in nets) + "." + caveat))
    else:
        s.add(Paragraph("NKID not computed (no feature network); the privacy-utility scatter uses PSNR."))
    held_cols = [f"NKID {heldout} held-out (%)", "PSNR held-out (dB)"] if heldout else []
    s.add(Table(["Model defense", "Output defense", "Status", "Score", "AUC", "TPR@0.1%FPR", "NKID non-members (%)",
                 *held_cols, "PSNR non-members (dB)", "PSNR gap members-non (dB)", "Paper AUCROC (%)",
                 "Paper NKID (%)"],
                rows, caption="results.json: cells[kind=membership]"))
    done = [c for c in cells if c.status == "done"]
    if done:
        for c in done:
            f = builder.figure(_roc_figure([c], builder.fig_dir / f"membership_roc_{c.id}.png"),
                               f"ROC: model {c.model_defense}, output defense {c.defense} ({c.headline} score)")
            if f:
                s.add(f)
        f = builder.figure(_scatter(done, builder.fig_dir / "membership_privacy_utility.png"),
                           "Privacy-utility: attack AUC vs utility loss (closer to the bottom left is better)")
        if f:
            s.add(f)
    return [s]


def kind_sections(kind: str, results: Results, builder: Any) -> list[Section]:
    """Report sections of cells of ``kind`` (extraction has its own sections in the main document)."""
    if kind == "membership":
        return membership_sections(results, builder)
    if kind == "monitor":
        from evaluation.report.monitor import monitor_sections

        return monitor_sections(results, builder)
    if kind == "watermark":
        from evaluation.report.watermark import watermark_sections

        return watermark_sections(results, builder)
    return []


def roc_png(curves: dict[str, tuple[list[float], list[float], float]], path: Path) -> Path:
    """ROC curves ``{label: (fpr, tpr, auc)}`` on log-free axes, as a PNG."""
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    for label, (fpr, tpr, auc) in curves.items():
        ax.plot(fpr, tpr, label=f"{label} (AUC {auc:.3f})")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set_xlabel("false-positive rate")
    ax.set_ylabel("true-positive rate")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)
