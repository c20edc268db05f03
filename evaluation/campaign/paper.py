"""Campaign extras for reproducing a source paper: its numbers beside ours, A/B/C tables, receptive fields.

Small functions the extraction cell kind calls from its ``finish`` (after every extraction cell ran;
:func:`report_paper` ties them together):

- :func:`paper_rows`: every ``[[paper.rows]]`` entry with our value from the matching cell: B is the
  cell's fidelity (surrogate vs clean victim), C its quality (surrogate vs ground truth), A the clean
  victim's quality (``utility`` entry of defense ``none``); FID/KID only where a feature network ran.
- :func:`extraction_tables`: the extraction paper's full A/B/C table with Welch + TOST (Szyller et al.,
  "Good Artists Copy, Great Artists Steal", Tables 2-4; equivalence bound Cohen's d, ``evaluation.d_bound``)
  for the victims in ``paper.extraction``, using the surrogate of the largest budget, defense ``none``.
- :func:`receptive_field`: measured receptive field of a same-size surrogate (the single-example
  paper's x axis, Spingarn-Eliezer & Michaeli, Fig. 3a).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from evaluation.campaign.config import CampaignConfig
from evaluation.extraction import PairSet, evaluate_extraction
from evaluation.metrics import MetricSettings
from evaluation.results import CampaignCell, Comparison, ExtractionTable, ImageGrid, PaperComparison, Results
from translators.archs import empirical_receptive_field

if TYPE_CHECKING:
    from evaluation.campaign.kinds.base import RunContext


def receptive_field(module: nn.Module, scale: int) -> int | None:
    """Side (input pixels) of the region that moves the centre output pixel; None for SR models."""
    if scale != 1:
        return None
    return empirical_receptive_field(module, size=96)


def _metric(comp: Comparison | None, metric: str) -> float | None:
    if comp is None:
        return None
    if metric == "fid":
        return comp.fid.value if comp.fid is not None else None
    if metric == "kid":
        return getattr(comp.kid, "mean", None) if comp.kid is not None else None
    return comp.mean(metric)


def _cell(results: Results, victim: str, budget: int | None) -> CampaignCell | None:
    done = [c for c in results.extraction_cells if c.victim == victim and c.defense == "none" and c.status == "done"
            and c.attacker == "plain"]
    if budget is not None:
        done = [c for c in done if c.budget == budget]
    return max(done, key=lambda c: c.budget, default=None)


def paper_rows(cfg: CampaignConfig, results: Results) -> list[PaperComparison]:
    """Our value for every ``[[paper.rows]]`` entry (None with a note when it cannot be measured)."""
    if cfg.paper is None:
        return []
    out = []
    for row in cfg.paper.rows:
        cell = _cell(results, row.victim, row.budget)
        if row.cell == "A":
            util = next((u for u in results.utility if u.victim == row.victim and u.defense == "none"), None)
            comp = util.quality_clean if util else None
        elif row.cell == "B":
            comp = cell.fidelity if cell else None
        else:
            comp = cell.quality if cell else None
        ours = _metric(comp, row.metric)
        note = row.note
        if ours is None:
            why = "no feature network" if row.metric in ("fid", "kid") else "cell missing or failed"
            note = f"{note}; not measured: {why}" if note else f"not measured: {why}"
        out.append(PaperComparison(label=row.label, victim=row.victim, cell=row.cell, metric=row.metric,
                                   budget=cell.budget if cell else row.budget, paper=row.paper,
                                   ours=round(ours, 4) if ours is not None else None, note=note))
    return out


def extraction_tables(
    cfg: CampaignConfig, results: Results, pairs: dict[str, list[PairSet]], victim_translator: Any,
    surrogate_translator: Any, feature_network: Any, out: Path,
) -> tuple[list[ExtractionTable], list[ImageGrid]]:
    """A/B/C tables (Welch + TOST) for ``paper.extraction`` victims; ``*_translator(name)`` give translators."""
    tables: list[ExtractionTable] = []
    grids: list[ImageGrid] = []
    if cfg.paper is None:
        return tables, grids
    for name in cfg.paper.extraction:
        cell = _cell(results, name, None)
        victim = next((v for v in results.victims if v.name == name), None)
        if cell is None or cell.surrogate is None or victim is None:
            continue
        table, g = evaluate_extraction(
            victim_translator(name), surrogate_translator(cell.surrogate.path), pairs[name], victim.model,
            cell.surrogate, victim.model.task or "translation", settings=MetricSettings(),
            feature_network=feature_network, d_bound=cfg.evaluation.d_bound, seed=cfg.campaign.seed,
            sample_dir=out / "extraction" / name, results_dir=out, n_samples=0)
        tables.append(table)
        grids.extend(g)
    return tables, grids


def report_paper(ctx: RunContext, pairs: dict[str, list[PairSet]]) -> None:
    """Fill ``results.extraction`` (A/B/C tables), ``paper_source`` and ``paper`` for ``[paper]``.

    ``pairs``: the extraction kind's ground-truth image sets per victim (the first set is scored). The
    victim is queried through the API with the unlimited honest key of defense ``none``.
    """
    from evaluation.campaign.translate import padded_translator
    from evaluation.campaign.victim import HttpTranslator
    from evaluation.defense_scoring import NO_DEFENSE
    from translators.checkpoint import load_model

    cfg, results = ctx.cfg, ctx.results
    if cfg.paper is None:
        return
    opened: list[HttpTranslator] = []

    def victim(name: str) -> HttpTranslator:
        opened.append(HttpTranslator(ctx.url(), name, ctx.honest_key(NO_DEFENSE)))
        return opened[-1]

    def surrogate(path: str) -> Any:
        return padded_translator(load_model(path).module)

    try:
        tables, _ = extraction_tables(cfg, results, pairs, victim, surrogate, ctx.shared.get("feature_network"),
                                      ctx.out)
    finally:
        for t in opened:
            t.close()
    results.extraction.extend(tables)
    results.paper_source = cfg.paper.source
    results.paper = paper_rows(cfg, results)
