"""Report section of ``monitor`` cells: detection delay per attacker, benign false positives, ROC over
clients, an escalation timeline, and the queries an attacker needs to reach the target PSNR with and
without escalation (the escalation cost ratio)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from evaluation.report.document import Paragraph, Section, Table
from evaluation.report.figures import save_figure
from evaluation.report.format import DASH
from evaluation.report.membership import roc_png
from evaluation.results import MonitorCell, Results


def _timeline_png(cell: MonitorCell, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    q = [p.query for p in cell.timeline]
    ax.plot(q, [p.risk for p in cell.timeline], label="risk")
    ax.set_xlabel("attacker's queries")
    ax.set_ylabel("risk")
    ax.set_ylim(0, 1.02)
    ax2 = ax.twinx()
    ax2.step(q, [p.level for p in cell.timeline], where="post", color="tab:red", label="level")
    ax2.set_ylabel("escalation level")
    fig.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)


def _q(v: Any) -> str:
    return "not flagged" if v is None else str(v)


def detection_table(cells: list[MonitorCell]) -> Table:
    """Attacker -> queries to detection (total queries when its first key was flagged) per cell."""
    rows = []
    for a_i, a in enumerate(cells[0].attackers):
        row = [a["name"].split("-", 1)[-1], a["strategy"], str(a["keys"]), str(a["rate_fraction"])]
        for c in cells:
            b = c.attackers[a_i] if a_i < len(c.attackers) else None
            if b is None:
                row.append(DASH)
                continue
            link = f", {b['linked_fraction']:.0%} keys linked" if b.get("linked_fraction") is not None else ""
            row.append(f"{_q(b['queries_to_detection'])} / {b['queries']}{link}")
        rows.append(row)
    return Table(["Attacker", "Strategy", "Keys", "Rate (x tier)",
                  *(f"{c.defense}: queries to detection" for c in cells)], rows,
                 caption="results.json: cells[kind=monitor].attackers")


def benign_table(cells: list[MonitorCell]) -> Table:
    rows = [[c.defense, "on" if c.escalation else "off", str(c.benign.get("clients", DASH)),
             str(c.benign.get("queries", DASH)), str(c.benign.get("flagged", DASH)), f"{c.benign.get('fpr', 0):.3f}",
             str(c.benign.get("escalated", DASH)), str(c.benign.get("linked", DASH)),
             DASH if c.roc_auc is None else f"{c.roc_auc:.3f}", "yes" if c.caught_up else "no"] for c in cells]
    return Table(["Tier", "Escalation", "Benign clients", "Queries", "Flagged", "FPR", "Escalated", "Linked",
                  "ROC AUC", "Monitor caught up"], rows, caption="results.json: cells[kind=monitor].benign, roc_auc")


def cost_table(cells: list[MonitorCell]) -> Table:
    rows = []
    for c in cells:
        for p in c.cost:
            rows.append([c.defense, "on" if c.escalation else "off", str(p.budget), str(p.queries_used or DASH),
                         DASH if p.psnr is None else f"{p.psnr:.2f}", _q(p.flagged_at_query),
                         DASH if p.level is None else str(p.level),
                         p.training.describe() if p.training else DASH])
    return Table(["Tier", "Escalation", "Budget (answered queries)", "Requests (incl. 503s)",
                  "Surrogate PSNR to clean victim (dB)", "Flagged at query", "Final level", "Surrogate training"],
                 rows,
                 caption="results.json: cells[kind=monitor].cost")


def ratio_table(cells: list[MonitorCell]) -> Table:
    rows = []
    for c in cells:
        q = DASH if c.queries_to_target is None else f"{c.queries_to_target:g}"
        if c.queries_to_target is None and c.cost:
            q = f"> {max(p.budget for p in c.cost)} (not reached)"
        ratio = DASH if c.escalation_ratio is None else (
            f"{'>= ' if c.ratio_lower_bound else ''}{c.escalation_ratio:g}x")
        rows.append([c.victim, c.defense, "on" if c.escalation else "off", f"{c.target_psnr:g}", q, ratio,
                     str(c.benign.get("escalated", DASH))])
    return Table(["Victim", "Tier", "Escalation", "Target PSNR (dB)", "Queries to target", "Escalation cost ratio",
                  "Benign clients escalated"], rows, caption="results.json: cells[kind=monitor].queries_to_target, "
                                                             "escalation_ratio")


def monitor_sections(results: Results, builder: Any) -> list[Section]:
    """The query-monitor section (see the module docstring)."""
    cells = [c for c in results.monitor_cells if c.status == "done"]
    s = builder.section("Query monitor")
    s.add(Paragraph(
        "Benign customers (each sends its own distinct photos: the null hypothesis of the false-positive rate) "
        "and attackers (every built-in strategy and the evasions: Sybil keys, slow rate, interleaved whole "
        "photos, augmented crops) run at once against the service with the monitor on. Queries to detection = "
        "the attacker's total queries when its first key was flagged. FPR = benign clients flagged / benign "
        "clients (a small population: read it with its count). ROC: threshold sweep over the final risk of "
        "each benign client vs each attacker (max over its keys). Escalation cost: a fresh key harvests each "
        "budget and trains a surrogate; queries to the target PSNR are interpolated between budgets."))
    failed = [c.id for c in results.monitor_cells if c.status != "done"]
    if failed:
        s.add(Paragraph(f"Not finished: {', '.join(failed)}."))
    if not cells:
        return [s]
    s.add(detection_table(cells), benign_table(cells), ratio_table(cells), cost_table(cells))
    curves = {f"{c.defense}": (c.roc.fpr, c.roc.tpr, c.roc_auc or 0.0) for c in cells if c.roc}
    if curves:
        f = builder.figure(roc_png(curves, builder.fig_dir / "monitor_roc.png"),
                           "ROC of the client risk: benign clients vs attackers, one curve per tier")
        if f:
            s.add(f)
    for c in cells:
        if c.timeline:
            first = next((p.query for p in c.timeline if p.flagged), None)
            top = max(p.level for p in c.timeline)
            s.add(Paragraph(f"Escalation timeline, tier {c.defense} (client `{c.timeline_client}`): flagged at query "
                            f"{_q(first)}, highest level {top} within {len(c.timeline)} queries."))
            f = builder.figure(_timeline_png(c, builder.fig_dir / f"monitor_timeline_{c.id}.png"),
                               f"Risk and escalation level after each query, tier {c.defense}")
            if f:
                s.add(f)
    return [s]
