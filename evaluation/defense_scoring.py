"""Score defenses: what they cost honest users against how much they hurt attackers.

- **Utility cost** (:func:`utility_cost`): the defended victim's output against its clean output
  (PSNR/SSIM: how much an honest user's image changes) and the victim's task quality against ground
  truth with and without the defense. ``utility_cost_db = PSNR_clean - PSNR_defended`` (vs ground truth).
- **Attack degradation** (:func:`surrogate_scores`, :func:`derive`): the surrogate's fidelity to the
  *clean* victim (PSNR of surrogate vs undefended victim output on benchmark images) at each query
  budget; degradation = fidelity without defense minus fidelity with it (dB, same budget and strategy).
- **Pareto front** (:func:`pareto_front`): defenses not dominated in (lower utility cost, higher
  attack degradation) at a reference budget (the largest by default).
- **Attack efficiency** (:func:`queries_to_target`): queries needed for the surrogate to reach a
  target fidelity, read off a fidelity-vs-queries curve by linear interpolation between the first
  measured point at or above the target and the one before it.
- **Attacker axis** (:func:`attacker_table`, :func:`best_defenses`): the same loss per attacker (``plain``, or
  ``adaptive``: the best counter-measure of :mod:`attacker.countermeasures`), each against the *same
  attacker* on the undefended victim, next to the honest-user PSNR (defended vs clean output); the best
  defense per victim is the largest positive loss at the largest budget with honest PSNR >= 40 dB (issue 10's bar).
  The degradation table, curves and Pareto fronts above use plain-attacker cells only.

:func:`derive` turns the cells and utility entries of a campaign's :class:`~evaluation.results.Results`
into :class:`~evaluation.results.Derived` (curves, queries-to-target, one defense table and one
Pareto front per victim), which the runner stores in ``results.json`` before rendering.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch

from evaluation.comparison import ComparisonBuilder
from evaluation.errors import EvaluationError
from evaluation.extraction import PairSet, Translator
from evaluation.features import FeatureNetwork
from evaluation.metrics import MetricSettings
from evaluation.results import (
    AttackerRow,
    BestDefense,
    CampaignCell,
    Comparison,
    CurvePoint,
    DefenseRow,
    DefenseUtility,
    Derived,
    FidelityCurve,
    ParetoFront,
    QueriesToTarget,
    Results,
)

NO_DEFENSE = "none"
PLAIN = "plain"
MIN_HONEST_PSNR = 40.0  # dB: the honest-user PSNR a perturbation defense must keep to be named best (issue 10)
UTILITY_METRICS = ("psnr", "ssim")
PARETO_TOL_DB = 0.05  # dB: honest-cost or attack-loss differences this small are ties on the Pareto front


def utility_cost(
    clean: Translator,
    defended: Translator,
    pairs: PairSet,
    victim: str,
    defense: str,
    settings: MetricSettings | None = None,
    metrics: Sequence[str] = UTILITY_METRICS,
    feature_network: FeatureNetwork | None = None,
    confidence: float = 0.95,
    seed: int = 0,
) -> DefenseUtility:
    """Honest-user cost of ``defended`` (the victim behind one defense) relative to ``clean``.

    ``clean``/``defended`` map ``(1, 3, h, w)`` inputs to outputs in [0, 1]; ``pairs`` supplies inputs
    and ground truth. One pass over the images.
    """
    args = (metrics, settings, feature_network, 100, 1000, seed)
    dvc = ComparisonBuilder("defended victim", "clean victim", pairs.name, *args)
    qc = ComparisonBuilder("clean victim", "ground truth", pairs.name, *args)
    qd = ComparisonBuilder("defended victim", "ground truth", pairs.name, *args)
    for pair in pairs.pairs():
        c, d = clean(pair.input), defended(pair.input)
        dvc.add(pair.name, d, c)
        qc.add(pair.name, c, pair.target)
        qd.add(pair.name, d, pair.target)
    if dvc.n == 0:
        raise EvaluationError(f"image set {pairs.name!r} produced no pairs")
    return DefenseUtility(victim=victim, defense=defense, defended_vs_clean=dvc.finish(confidence),
                          quality_clean=qc.finish(confidence), quality_defended=qd.finish(confidence))


def surrogate_scores(
    surrogate: Translator,
    clean_victim: Translator,
    pairs: PairSet,
    settings: MetricSettings | None = None,
    metrics: Sequence[str] = ("psnr", "ssim", "ms_ssim"),
    feature_network: FeatureNetwork | None = None,
    confidence: float = 0.95,
    seed: int = 0,
    victim_outputs: Mapping[str, torch.Tensor] | None = None,
) -> tuple[Comparison, Comparison]:
    """``(fidelity, quality)`` of one surrogate: vs the clean victim's outputs, and vs ground truth.

    ``victim_outputs`` (image name -> clean victim output) avoids recomputing the victim for each cell.
    """
    args = (metrics, settings, feature_network, 100, 1000, seed)
    fid_b = ComparisonBuilder("surrogate", "clean victim", pairs.name, *args)
    qual_b = ComparisonBuilder("surrogate", "ground truth", pairs.name, *args)
    for pair in pairs.pairs():
        s = surrogate(pair.input)
        v = victim_outputs[pair.name] if victim_outputs is not None and pair.name in victim_outputs else \
            clean_victim(pair.input)
        fid_b.add(pair.name, s, v)
        qual_b.add(pair.name, s, pair.target)
    if fid_b.n == 0:
        raise EvaluationError(f"image set {pairs.name!r} produced no pairs")
    return fid_b.finish(confidence), qual_b.finish(confidence)


# --- curves and efficiency -------------------------------------------------------------------------------


def queries_to_target(points: Iterable[tuple[float, float]], target: float) -> float | None:
    """Queries at which a fidelity curve first reaches ``target``; None if it never does.

    ``points`` are ``(queries, value)``; they are sorted by queries. If the first point already
    reaches the target its query count is returned (no extrapolation below measured budgets);
    otherwise the answer interpolates linearly between the last point below and the first at or above.
    """
    pts = sorted((float(q), float(v)) for q, v in points)
    prev: tuple[float, float] | None = None
    for q, v in pts:
        if v >= target:
            if prev is None or v == prev[1]:
                return q
            q0, v0 = prev
            return q0 + (target - v0) * (q - q0) / (v - v0)
        prev = (q, v)
    return None


def _cell_value(cell: CampaignCell, metric: str) -> tuple[float | None, float | None, float | None]:
    if cell.status != "done" or cell.fidelity is None or metric not in cell.fidelity.metrics:
        return None, None, None
    s = cell.fidelity.metrics[metric].summary
    return s.mean, s.ci_low, s.ci_high


def fidelity_curves(results: Results, metric: str = "psnr") -> list[FidelityCurve]:
    """One curve per (victim, defense, strategy): mean surrogate fidelity of finished plain-attacker cells vs
    queries (adaptive-attacker cells are summarised by :func:`attacker_table`).

    The x value is the queries the attack actually used (``queries_used``), else its budget.
    """
    groups: dict[tuple[str, str, str], list[CurvePoint]] = defaultdict(list)
    for cell in results.extraction_cells:
        if cell.attacker != PLAIN:
            continue
        mean, lo, hi = _cell_value(cell, metric)
        if mean is None:
            continue
        q = cell.queries_used if cell.queries_used is not None else cell.budget
        groups[(cell.victim, cell.defense, cell.strategy)].append(
            CurvePoint(budget=cell.budget, queries=q, value=mean, ci_low=lo, ci_high=hi, cell_id=cell.id))
    return [
        FidelityCurve(victim=v, defense=d, strategy=s, metric=metric, points=sorted(pts, key=lambda p: p.queries))
        for (v, d, s), pts in sorted(groups.items())
    ]


def pareto_front(points: Mapping[str, tuple[float, float]], tol: float = 0.0) -> list[str]:
    """Labels of points not dominated when minimising ``x`` (cost) and maximising ``y`` (gain).

    A point dominates another if it is no worse on both axes and better by more than ``tol`` on one
    (differences within ``tol``, in the axes' unit, are ties: a 0.001 dB edge is noise, not a better
    defense). Returned in increasing ``x`` order.
    """
    front = []
    for label, (x, y) in points.items():
        dominated = any(
            (x2 <= x + tol and y2 >= y - tol) and (x2 < x - tol or y2 > y + tol)
            for other, (x2, y2) in points.items() if other != label
        )
        if not dominated:
            front.append(label)
    return sorted(front, key=lambda lbl: (points[lbl][0], -points[lbl][1]))


def _mean(comp: Comparison | None, metric: str) -> float | None:
    return comp.mean(metric) if comp is not None else None


def _defense_rows(
    results: Results, victim: str, strategy: str, metric: str, ref_budget: int
) -> tuple[list[DefenseRow], ParetoFront | None]:
    util = {u.defense: u for u in results.utility if u.victim == victim}
    fidelity: dict[tuple[str, int], float | None] = {}
    for cell in results.extraction_cells:
        if cell.victim == victim and cell.strategy == strategy and cell.attacker == PLAIN:
            fidelity[(cell.defense, cell.budget)] = _cell_value(cell, metric)[0]
    labels = [d.label for d in results.defenses] or sorted({d for d, _ in fidelity} | set(util))
    rows: list[DefenseRow] = []
    for label in labels:
        u = util.get(label)
        row = DefenseRow(victim=victim, defense=label, strategy=strategy)
        if u is not None:
            row.honest_psnr = _mean(u.defended_vs_clean, "psnr")
            row.honest_ssim = _mean(u.defended_vs_clean, "ssim")
            row.quality_clean_psnr = _mean(u.quality_clean, "psnr")
            row.quality_defended_psnr = _mean(u.quality_defended, "psnr")
            if row.quality_clean_psnr is not None and row.quality_defended_psnr is not None:
                row.utility_cost_db = row.quality_clean_psnr - row.quality_defended_psnr
        for b in results.budgets or sorted({b for _, b in fidelity}):
            value = fidelity.get((label, b))
            base = fidelity.get((NO_DEFENSE, b))
            row.attacker_psnr[str(b)] = value
            row.attack_degradation_db[str(b)] = base - value if value is not None and base is not None else None
        rows.append(row)
    pts = {
        r.defense: (r.utility_cost_db, r.attack_degradation_db.get(str(ref_budget)))
        for r in rows
        if r.utility_cost_db is not None and r.attack_degradation_db.get(str(ref_budget)) is not None
    }
    if not pts:
        return rows, None
    clean_pts = {k: (float(x), float(y)) for k, (x, y) in pts.items() if x is not None and y is not None}
    front = pareto_front(clean_pts, tol=PARETO_TOL_DB)
    for r in rows:
        r.pareto_optimal = r.defense in front
    return rows, ParetoFront(victim=victim, strategy=strategy, budget=ref_budget, points=clean_pts, front=front)


def attacker_table(results: Results, metric: str = "psnr") -> list[AttackerRow]:
    """Victim x defense x attacker (x strategy) rows: honest-user PSNR (defended vs clean victim output), the
    attacker's fidelity to the clean victim per budget, and its loss vs the same attacker, strategy and
    budget against the undefended victim (defense ``none``), in dB."""
    util = {(u.victim, u.defense): _mean(u.defended_vs_clean, "psnr") for u in results.utility}
    cells = [c for c in results.extraction_cells if c.status == "done"]
    fid = {(c.victim, c.defense, c.attacker, c.strategy, c.budget): _cell_value(c, metric)[0] for c in cells}
    chosen = {(c.victim, c.defense, c.attacker, c.strategy, c.budget): c.counter for c in cells}
    budgets = results.budgets or sorted({c.budget for c in results.extraction_cells})
    victims = [v.name for v in results.victims] or sorted({c.victim for c in results.extraction_cells})
    labels = [d.label for d in results.defenses] or sorted({c.defense for c in results.extraction_cells})
    attackers = [a for a in (PLAIN, "adaptive") if any(c.attacker == a for c in results.extraction_cells)]
    strategies = results.strategies or sorted({c.strategy for c in results.extraction_cells})
    rows = []
    for victim in victims:
        for strategy in strategies:
            for label in labels:
                for who in attackers:
                    row = AttackerRow(victim=victim, defense=label, attacker=who, strategy=strategy,
                                      honest_psnr=util.get((victim, label)))
                    for b in budgets:
                        value = fid.get((victim, label, who, strategy, b))
                        base = fid.get((victim, NO_DEFENSE, who, strategy, b))
                        row.attacker_psnr[str(b)] = value
                        row.loss_db[str(b)] = base - value if value is not None and base is not None else None
                        row.counter[str(b)] = chosen.get((victim, label, who, strategy, b))
                    rows.append(row)
    return rows


def attacker_pareto(rows: Sequence[AttackerRow], victim: str, budget: int
                    ) -> dict[str, tuple[dict[str, tuple[float, float]], list[str]]]:
    """Per attacker: ``{defense: (honest PSNR dB, fidelity loss dB at budget)}`` of ``victim``'s defenses
    (``none`` excluded) and the Pareto front (no other defense keeps honest PSNR at least as high *and*
    costs the attacker at least as much, one strictly), in decreasing honest PSNR."""
    out: dict[str, tuple[dict[str, tuple[float, float]], list[str]]] = {}
    for r in rows:
        loss = r.loss_db.get(str(budget))
        if r.victim != victim or r.defense == NO_DEFENSE or loss is None or r.honest_psnr is None:
            continue
        out.setdefault(r.attacker, ({}, []))[0][r.defense] = (float(r.honest_psnr), float(loss))
    for pts, front in out.values():
        front.extend(pareto_front({k: (-x, y) for k, (x, y) in pts.items()}, tol=PARETO_TOL_DB))
    return out


def best_defenses(rows: Sequence[AttackerRow], budget: int, min_honest_psnr: float = MIN_HONEST_PSNR
                  ) -> list[BestDefense]:
    """Per victim (and attacker): the defense other than ``none`` with the largest positive fidelity loss
    at ``budget`` among those whose honest-user PSNR is at least ``min_honest_psnr`` dB (None when no such
    defense costs the attacker anything)."""
    out = []
    for victim, who in dict.fromkeys((r.victim, r.attacker) for r in rows):
        best = BestDefense(victim=victim, attacker=who, budget=budget, min_honest_psnr=min_honest_psnr)
        for r in rows:
            loss = r.loss_db.get(str(budget))
            if (r.victim, r.attacker) != (victim, who) or r.defense == NO_DEFENSE or loss is None or loss <= 0:
                continue
            if r.honest_psnr is None or r.honest_psnr < min_honest_psnr:
                continue
            if best.loss_db is None or loss > best.loss_db:
                best.defense, best.loss_db, best.honest_psnr = r.defense, loss, r.honest_psnr
        out.append(best)
    return out


def derive(
    results: Results,
    target: float = 25.0,
    metric: str = "psnr",
    reference_budget: int | None = None,
    on_warning: Callable[[str], None] | None = None,
) -> Derived:
    """Curves, queries-to-target, defense tables and Pareto fronts for a campaign's results.

    ``target`` is the fidelity (``metric``, default PSNR in dB) an attacker aims for.
    ``reference_budget`` picks the budget of the Pareto front (default: the largest budget).
    """
    curves = fidelity_curves(results, metric)
    budgets = results.budgets or sorted({c.budget for c in results.extraction_cells})
    qtt = []
    for c in curves:
        q = queries_to_target([(p.queries, p.value) for p in c.points], target)
        first = min(p.queries for p in c.points)
        qtt.append(QueriesToTarget(victim=c.victim, defense=c.defense, strategy=c.strategy, metric=metric,
                                   target=target, queries=q, reached=q is not None,
                                   at_first_point=q is not None and q == first,
                                   max_queries=max(p.queries for p in c.points)))
    table: list[DefenseRow] = []
    fronts: list[ParetoFront] = []
    if budgets:
        ref = reference_budget if reference_budget is not None else max(budgets)
        if ref not in budgets:
            raise EvaluationError(f"reference budget {ref} is not one of the campaign's budgets {budgets}")
        victims = [v.name for v in results.victims] or sorted({c.victim for c in results.extraction_cells})
        strategies = results.strategies or sorted({c.strategy for c in results.extraction_cells})
        for victim in victims:
            for strategy in strategies:
                rows, front = _defense_rows(results, victim, strategy, metric, ref)
                table.extend(rows)
                if front is not None:
                    fronts.append(front)
                elif on_warning:
                    on_warning(f"no Pareto front for {victim}/{strategy}: missing utility or '{NO_DEFENSE}' cells")
    arows = attacker_table(results, metric) if budgets else []
    best = best_defenses(arows, max(budgets)) if arows else []
    return Derived(target_metric=metric, target_value=target, curves=curves, queries_to_target=qtt,
                   defense_table=table, pareto=fronts, attacker_table=arows, best_defenses=best)
