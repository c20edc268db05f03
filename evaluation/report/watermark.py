"""Report section of ``watermark`` cells: "theft provable: p = ..." beside honest cost and attack fidelity.

Everything is read from ``results.json``: ``cells[kind=watermark]`` (fidelity, trace, ownership,
calibration_p_value) and ``utility`` (honest-user cost of each defense). The verdict threshold is
``heist defend verify``'s: p < 1e-6 is "theft provable".
"""

from __future__ import annotations

from typing import Any

from evaluation.report.document import Bullets, Paragraph, Section, Table
from evaluation.report.format import DASH, mean_ci, num, pvalue
from evaluation.results import Results, WatermarkCell

PROVABLE_P = 1e-6  # evaluation.campaign.kinds.watermark.PROVABLE_P (kept import-free: the report reads JSON only)
EVIDENCE_P = 0.01


def verdict(p: float | None) -> str:
    """``theft provable: p = ...`` (p < 1e-6), ``evidence only: p = ...`` (p < 0.01) or ``not provable: p = ...``."""
    if p is None:
        return DASH
    word = "theft provable" if p < PROVABLE_P else "evidence only" if p < EVIDENCE_P else "not provable"
    return f"{word}: p = {pvalue(p)}"


def trace_text(c: WatermarkCell) -> str:
    """``identified/images (rate %)`` of the harvest's outputs, with misattributions when any."""
    t = c.trace
    if t is None:
        return DASH
    if t.rate is None:
        return f"{DASH} ({t.images} outputs; no harvester key name known)"
    wrong = f", {t.misattributed} to another key" if t.misattributed else ""
    return f"{t.identified}/{t.images} ({100 * t.rate:.1f}%){wrong}"


def _honest(results: Results, c: WatermarkCell, metric: str) -> str:
    u = next((u for u in results.utility if u.victim == c.victim and u.defense == c.defense), None)
    m = u.defended_vs_clean.metrics.get(metric) if u else None
    return mean_ci(m.summary if m else None, metric)


def _fidelity(c: WatermarkCell) -> str:
    m = c.fidelity.metrics.get("psnr") if c.fidelity else None
    return mean_ci(m.summary if m else None, "psnr")


def _surrogate(c: WatermarkCell) -> str:
    """``"resunet, 600 steps"``: how strongly a surrogate carries the mark grows with its training."""
    kind = c.surrogate_kind or DASH
    return f"{kind}, {c.training.steps} steps" if c.training else kind


def watermark_sections(results: Results, builder: Any) -> list[Section]:
    """The watermark section: the per-cell table, the counter-measure pivot and the false-claim count."""
    cells = results.watermark_cells
    s = builder.section("Watermarks: is the theft provable?")
    first = next((c.ownership for c in cells if c.ownership), None)
    s.add(Paragraph("Each thief harvests through one defense tier with its own API key and trains a surrogate "
                    "(after its counter-measure on the harvested outputs). Ownership: `heist defend verify`'s test of "
                    "the surrogate against the clean victim"
                    + (f" ({first.probes} probes of {first.probe_side} px from `{first.probe_images}`"
                       + (f" with Gaussian noise sigma {first.probe_noise:.3f}" if first.probe_noise else "")
                       + f", key `{first.key_id}`)" if first else "") + ". Calibration: the same test on the surrogate "
                    "of the undefended victim (defense `none`, same counter-measure), a model never trained on "
                    "marked outputs."),
          Bullets([
              f"Verdict: **theft provable** when p < {PROVABLE_P:g} (the threshold of `heist defend verify`), "
              f"evidence only when p < {EVIDENCE_P:g}, else not provable.",
              "Null hypothesis: " + (first.null if first else DASH),
              "Honest cost: the defended output vs the clean output for an honest user (PSNR dB, SSIM; 80 dB = "
              "identical). Fidelity: surrogate vs the clean victim (PSNR dB).",
              "Trace: harvested outputs, as the attacker stored them, whose trace named the harvesting key "
              "(`heist defend trace`; candidates: every key of the service).",
          ]))
    rows = []
    for c in cells:
        p = c.ownership.p_value if c.ownership else None
        rows.append([c.victim, c.defense, c.counter, c.status, _honest(results, c, "psnr"), _honest(results, c, "ssim"),
                     _fidelity(c), _surrogate(c), trace_text(c), verdict(p),
                     pvalue(c.calibration_p_value), c.error or ""])
    s.add(Table(["Victim", "Defense", "Counter-measure", "Status", "Honest PSNR (dB)", "Honest SSIM",
                 "Fidelity PSNR (dB)", "Surrogate (steps)", "Trace identified", "Ownership", "Calibration p (innocent)",
                 "Error"], rows,
                caption="results.json: cells[kind=watermark] (trace, ownership, calibration_p_value), utility"))
    counters = list(dict.fromkeys(c.counter for c in cells))
    marked = [c for c in cells if c.ownership_marked]
    if marked:
        keys = list(dict.fromkeys((c.victim, c.surrogate_kind or DASH, c.defense) for c in marked))
        by = {(c.victim, c.surrogate_kind or DASH, c.defense, c.counter): c for c in marked}
        prow = [[v, k, d, *[pvalue(by[(v, k, d, ctr)].ownership.p_value)  # type: ignore[union-attr]
                            if (v, k, d, ctr) in by and by[(v, k, d, ctr)].ownership else DASH
                            for ctr in counters]] for v, k, d in keys]
        s.add(Table(["Victim", "Surrogate kind", "Defense", *[f"p ({ctr})" for ctr in counters]], prow,
                    caption="Ownership p-value: surrogate kind x thief counter-measure "
                            "(results.json: cells[kind=watermark].ownership.p_value)"))
    innocent = [c.ownership.p_value for c in cells if c.ownership and not c.ownership_marked]
    if innocent:
        s.add(Paragraph(f"False claims on innocent surrogates (defenses without ownership_watermark): "
                        f"{sum(p < EVIDENCE_P for p in innocent)} of {len(innocent)} at p < {EVIDENCE_P:g}, "
                        f"{sum(p < PROVABLE_P for p in innocent)} at p < {PROVABLE_P:g}; smallest innocent p = "
                        f"{pvalue(min(innocent))}."))
    unmarked = [c.trace for c in cells if c.trace and not c.trace_marked and c.trace.rate is not None]
    if unmarked:
        named = sum(t.identified + t.misattributed for t in unmarked)
        total = sum(t.images for t in unmarked)
        s.add(Paragraph(f"Trace false matches on tiers without trace_watermark: {named} of {total} harvested "
                        f"outputs named a key (threshold p_false_match <= {num(unmarked[0].max_false_match, 'p')})."))
    return [s]
