"""Defense scoring: utility cost on real images, Pareto fronts, queries-to-target and derived summaries."""

from __future__ import annotations

import pytest
import torch

from evaluation.defense_scoring import derive, pareto_front, queries_to_target, surrogate_scores, utility_cost
from evaluation.errors import EvaluationError
from evaluation.extraction import as_translator, recipe_pairs
from evaluation.metrics import psnr
from evaluation.results import (
    CampaignCell,
    Comparison,
    DefenseEntry,
    DefenseUtility,
    MetricScores,
    ModelRef,
    Results,
    VictimEntry,
)
from evaluation.stats import summarize
from translators.archs import build_arch
from translators.zoo import get_recipe


def test_queries_to_target_interpolates_between_budgets() -> None:
    pts = [(100, 20.0), (400, 26.0), (1600, 29.0)]
    assert queries_to_target(pts, 23.0) == pytest.approx(250.0)  # halfway between 100 and 400
    assert queries_to_target(pts, 29.0) == pytest.approx(1600.0)
    assert queries_to_target(pts, 19.0) == 100.0  # already reached at the first budget: no extrapolation
    assert queries_to_target(pts, 30.0) is None
    # the first crossing counts, even if the curve dips afterwards; unsorted input is sorted
    assert queries_to_target([(400, 25.0), (100, 24.0), (1600, 24.5)], 24.5) == pytest.approx(250.0)


def test_pareto_front() -> None:
    pts = {"none": (0.0, 0.0), "jpeg": (0.5, 2.0), "noise": (1.0, 1.5), "wm": (0.5, 1.0), "fmd": (2.0, 4.0)}
    # noise is dominated by jpeg (cheaper and stronger); wm is dominated by jpeg (same cost, weaker)
    assert pareto_front(pts) == ["none", "jpeg", "fmd"]
    assert pareto_front({"a": (1.0, 1.0), "b": (1.0, 1.0)}) == ["a", "b"]  # ties dominate nobody
    assert pareto_front({}) == []
    near = {"a": (1.0, 5.0), "b": (1.0, 5.001), "c": (1.2, 4.0)}
    assert pareto_front(near) == ["b"]  # a loses by a thousandth of a dB without a tolerance
    assert pareto_front(near, tol=0.05) == ["b", "a"]  # within the tolerance a and b tie; c is still dominated


def _comp(values: list[float], metric: str = "psnr", output: str = "surrogate", ref: str = "clean victim"
          ) -> Comparison:
    names = [f"im{i}" for i in range(len(values))]
    return Comparison(output=output, reference=ref, image_set="benchmark", n_images=len(values), metrics={
        metric: MetricScores(metric=metric, summary=summarize(values, n_resamples=200),
                             per_image=dict(zip(names, values)))})


def _results() -> Results:
    fid = {("none", 10): [20.0, 22.0], ("none", 40): [26.0, 28.0],
           ("jpeg", 10): [19.0, 19.0], ("jpeg", 40): [22.0, 24.0],
           ("noise", 10): [20.0, 21.0]}
    cells = []
    for (d, b), vals in fid.items():
        cells.append(CampaignCell(id=f"v/{d}/{b}/random", victim="v", defense=d, budget=b, strategy="random",
                                  status="done", queries_used=b - 1, fidelity=_comp(vals)))
    cells.append(CampaignCell(id="v/noise/40/random", victim="v", defense="noise", budget=40, strategy="random",
                              status="failed", error="victim died"))
    util = [DefenseUtility(victim="v", defense=d, defended_vs_clean=_comp([h, h], ref="clean"),
                           quality_clean=_comp([30.0, 30.0]), quality_defended=_comp([q, q]))
            for d, h, q in (("none", 80.0, 30.0), ("jpeg", 35.0, 29.0), ("noise", 30.0, 27.0))]
    return Results(kind="campaign", name="t", victims=[VictimEntry(name="v", model=ModelRef(name="v"))],
                   defenses=[DefenseEntry(label=x, name=x) for x in ("none", "jpeg", "noise")], budgets=[10, 40],
                   strategies=["random"], cells=cells, utility=util)


def test_derive_curves_tables_and_front() -> None:
    d = derive(_results(), target=25.0)
    curves = {c.defense: c for c in d.curves}
    assert [(p.queries, p.value) for p in curves["none"].points] == [(9, 21.0), (39, 27.0)]
    assert len(curves["noise"].points) == 1  # the failed cell leaves a gap, it is not plotted as 0
    q = {x.defense: x for x in d.queries_to_target}
    assert q["none"].queries == pytest.approx(9 + (25 - 21) / (27 - 21) * 30)
    assert not q["none"].at_first_point
    assert {x.defense: x for x in derive(_results(), target=20.0).queries_to_target}["none"].at_first_point
    assert q["jpeg"].reached is False
    assert q["jpeg"].queries is None
    assert q["jpeg"].max_queries == 39
    rows = {r.defense: r for r in d.defense_table}
    assert rows["jpeg"].utility_cost_db == pytest.approx(1.0)
    assert rows["jpeg"].attacker_psnr == {"10": 19.0, "40": 23.0}
    assert rows["jpeg"].attack_degradation_db == {"10": pytest.approx(2.0), "40": pytest.approx(4.0)}
    assert rows["noise"].attack_degradation_db == {"10": pytest.approx(0.5), "40": None}
    assert rows["none"].honest_psnr == 80.0
    assert rows["none"].utility_cost_db == 0.0
    (front,) = d.pareto
    assert front.budget == 40
    assert front.points == {"none": (0.0, 0.0), "jpeg": (1.0, 4.0)}
    assert front.front == ["none", "jpeg"]
    assert rows["jpeg"].pareto_optimal
    assert not rows["noise"].pareto_optimal
    # the front at the smaller budget includes noise (it has a value there) but jpeg dominates it
    d10 = derive(_results(), reference_budget=10)
    assert d10.pareto[0].front == ["none", "jpeg"]
    assert "noise" in d10.pareto[0].points
    with pytest.raises(EvaluationError, match="reference budget 20"):
        derive(_results(), reference_budget=20)


def test_utility_cost_and_surrogate_scores_on_real_images() -> None:
    torch.set_num_threads(1)
    recipe = get_recipe("sr4x")
    ps = recipe_pairs("benchmark", "corpus:benchmark", recipe.make_pair, 4, 1, max_side=64)
    torch.manual_seed(0)
    clean = as_translator(build_arch("srresnet", {"scale": 4, "channels": 8, "n_blocks": 1}).eval())

    def noisy(x: torch.Tensor) -> torch.Tensor:
        y = clean(x)
        g = torch.Generator().manual_seed(0)
        return (y + 0.05 * torch.randn(y.shape, generator=g)).clamp(0, 1)

    none = utility_cost(clean, clean, ps, "v", "none")
    assert all(v == pytest.approx(80.0) for v in none.defended_vs_clean.metrics["psnr"].per_image.values())
    u = utility_cost(clean, noisy, ps, "v", "noise")
    pairs = list(ps.pairs())
    expected = [float(psnr(noisy(p.input), clean(p.input))) for p in pairs]
    assert list(u.defended_vs_clean.metrics["psnr"].per_image.values()) == pytest.approx(expected, abs=1e-6)
    assert 24 < u.defended_vs_clean.metrics["psnr"].summary.mean < 28  # sigma 0.05 noise is about 26 dB
    assert u.quality_defended.mean("psnr") < u.quality_clean.mean("psnr")
    assert u.quality_clean.mean("psnr") == pytest.approx(none.quality_clean.mean("psnr"))
    fidelity, quality = surrogate_scores(noisy, clean, ps, metrics=("psnr",))
    assert fidelity.mean("psnr") == pytest.approx(u.defended_vs_clean.mean("psnr"), abs=1e-9)
    assert quality.mean("psnr") == pytest.approx(u.quality_defended.mean("psnr"), abs=1e-9)
