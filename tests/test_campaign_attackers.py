"""The extraction campaign's attacker axis (plain vs adaptive): cells expand per attacker, the perturbation
table and Pareto data are computed from the cells and utility of ``results.json``, and a tiny
perturbation-style campaign with both attackers runs end to end through the real HTTP service."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from evaluation.campaign.config import CampaignConfigError, load_campaign, parse_campaign
from evaluation.campaign.kinds import CELL_KINDS
from evaluation.campaign.kinds.base import CellPaths
from evaluation.defense_scoring import attacker_pareto, derive
from evaluation.results import (
    CampaignCell,
    Comparison,
    DefenseEntry,
    DefenseUtility,
    MetricScores,
    ModelRef,
    Results,
    VictimEntry,
    read_results,
)
from evaluation.stats import summarize

BASE = """[campaign]
name = "pert-mini"
zoo_profile = "tiny"

[limits]
rate = 50.0
burst = 20

[[victims]]
name = "denoise25"
surrogate = "unet-l2"
surrogate_profile = "tiny"
train_steps = 20

[[defenses]]
label = "none"

[[defenses]]
label = "noise"
pipeline = [{ name = "noise", sigma = 0.03, per_input = true }]

[attack]
budgets = [4, 8]
strategies = ["crops"]
strategy_params = { crop_size = 48 }
attackers = ["plain", "adaptive"]
counters = ["lowpass:sigma=1.0", "median"]

[evaluation]
max_side = 48
samples = 0
"""


def test_the_attacker_axis_expands_cells_and_keeps_plain_ids() -> None:
    cfg = parse_campaign(BASE)
    params = cfg.extraction
    kind = CELL_KINDS["extraction"]
    plans = kind.plan(cfg, params)
    assert len(plans) == 1 * 2 * 2 * 2  # victims x defenses x budgets x attackers
    ids = [p.id for p in plans]
    assert len(set(ids)) == len(ids)
    assert "denoise25.noise.crops.b4" in ids  # plain: the id campaigns had before the axis (resume)
    assert "denoise25.noise.crops.b4.adaptive" in ids
    for p in plans:
        cell = kind.pending(cfg, params, p, CellPaths(Path("/tmp/x")))
        assert cell.attacker == ("adaptive" if p.id.endswith(".adaptive") else "plain")
        assert f".b{cell.budget}" in p.id
        assert cell.defense == p.defense
    plain_only = parse_campaign(BASE.replace('attackers = ["plain", "adaptive"]\n', ""))
    assert len(kind.plan(plain_only, plain_only.extraction)) == 4


def test_bad_attackers_and_counters_are_reported_at_their_line() -> None:
    for old, new, needle in [
        ('attackers = ["plain", "adaptive"]', 'attackers = ["plain", "smart"]', "attack.attackers"),
        ('attackers = ["plain", "adaptive"]', 'attackers = ["plain", "plain"]', "must not repeat"),
        ('counters = ["lowpass:sigma=1.0", "median"]', 'counters = ["blur"]', "kinds: none, lowpass"),
        ('counters = ["lowpass:sigma=1.0", "median"]', 'counters = ["none"]', "plain attacker"),
        ('counters = ["lowpass:sigma=1.0", "median"]', 'counters = ["lowpass:sigma=-1"]', "sigma"),
    ]:
        with pytest.raises(CampaignConfigError) as err:
            parse_campaign(BASE.replace(old, new), "c.toml")
        line = next(i for i, t in enumerate(BASE.replace(old, new).splitlines(), 1) if new in t)
        assert str(err.value).startswith(f"c.toml:{line}:"), str(err.value)
        assert needle in str(err.value), str(err.value)


def test_the_shipped_perturbation_campaign_covers_the_grid() -> None:
    for profile, zoo in ((None, "tiny"), ("full", "default")):
        cfg, _ = load_campaign("configs/campaigns/perturbation.toml", profile)
        assert cfg.campaign.zoo_profile == zoo
        assert [v.name for v in cfg.victims] == ["sr4x", "denoise25", "style-teal"]
        labels = {d.label: [s["name"] for s in d.pipeline] for d in cfg.defenses}
        assert {"none", "jpeg75", "noise", "feature_amplify"} <= set(labels)
        assert sum(names == ["fmd"] for names in labels.values()) >= 1
        assert sum(names == ["poison"] for names in labels.values()) == 2  # two strengths
        assert cfg.extraction.budgets == [4, 16, 64]
        assert cfg.extraction.attackers == ["plain", "adaptive"]
        n = len(CELL_KINDS["extraction"].plan(cfg, cfg.extraction))
        assert n == 3 * len(labels) * 3 * 2


def _comp(values: list[float]) -> Comparison:
    per_image = {f"i{k}": v for k, v in enumerate(values)}
    scores = MetricScores(metric="psnr", summary=summarize(values), per_image=per_image)
    return Comparison(output="a", reference="b", image_set="benchmark", n_images=len(values), metrics={"psnr": scores})


def _synthetic() -> Results:
    """Two defenses, two attackers, two budgets; fidelity per cell = base - a known loss."""
    loss = {("weak", "plain"): 0.5, ("weak", "adaptive"): 0.2, ("strong", "plain"): 6.0,
            ("strong", "adaptive"): 3.0, ("costly", "plain"): 9.0, ("costly", "adaptive"): 8.0}
    honest = {"none": 80.0, "weak": 45.0, "strong": 41.0, "costly": 30.0}
    r = Results(kind="campaign", name="synthetic", budgets=[16, 64], strategies=["crops"],
                victims=[VictimEntry(name="v", recipe="sr4x", model=ModelRef(name="v"))],
                defenses=[DefenseEntry(label=k, name=k) for k in honest])
    for d, h in honest.items():
        r.utility.append(DefenseUtility(victim="v", defense=d, defended_vs_clean=_comp([h - 0.5, h + 0.5])))
    for who, base in (("plain", 30.0), ("adaptive", 31.0)):
        for b in (16, 64):
            for d in honest:
                fid = base + b / 64 - loss.get((d, who), 0.0) * b / 64
                r.cells.append(CampaignCell(
                    id=f"v.{d}.crops.b{b}.{who}", victim="v", defense=d, budget=b, strategy="crops", status="done",
                    attacker=who, fidelity=_comp([fid - 1, fid + 1]), counter="median" if who == "adaptive" else None))
    return r


def test_table_pareto_and_best_defense_come_from_the_results() -> None:
    r = _synthetic()
    d = derive(r)
    rows = {(x.defense, x.attacker): x for x in d.attacker_table}
    assert len(rows) == 4 * 2
    fid = {(c.defense, c.attacker, c.budget): c.fidelity.mean("psnr") for c in r.extraction_cells}
    for (label, who), row in rows.items():
        assert row.honest_psnr == pytest.approx(r.utility[[u.defense for u in r.utility].index(label)]
                                                .defended_vs_clean.mean("psnr"))
        for b in (16, 64):
            assert row.attacker_psnr[str(b)] == pytest.approx(fid[(label, who, b)])
            assert row.loss_db[str(b)] == pytest.approx(fid[("none", who, b)] - fid[(label, who, b)])
    assert rows[("strong", "adaptive")].loss_db["64"] == pytest.approx(3.0)
    assert rows[("strong", "adaptive")].counter["64"] == "median"
    best = {b.attacker: b for b in d.best_defenses}
    # "costly" hurts more but costs honest users 30 dB < 40: not eligible.
    assert best["adaptive"].defense == "strong"
    assert best["adaptive"].budget == 64
    assert best["adaptive"].loss_db == pytest.approx(3.0)
    # the legacy Pareto/degradation table uses the plain attacker only
    legacy = {x.defense: x for x in d.defense_table}
    assert legacy["strong"].attack_degradation_db["64"] == pytest.approx(6.0)
    pareto = attacker_pareto(d.attacker_table, "v", 64)
    pts, front = pareto["adaptive"]
    assert set(pts) == {"weak", "strong", "costly"}
    assert pts["costly"] == pytest.approx((30.0, 8.0))
    assert front == ["weak", "strong", "costly"]  # each trades honest PSNR for loss
    r.cells = [c for c in r.cells if not (c.defense == "weak" and c.attacker == "adaptive")]
    r.cells.append(CampaignCell(id="v.weak.x", victim="v", defense="weak", budget=64, strategy="crops",
                                status="done", attacker="adaptive", fidelity=_comp([1.0, 1.0])))
    d2 = derive(r)
    assert attacker_pareto(d2.attacker_table, "v", 64)["adaptive"][1] == ["weak"]  # dominates strong and costly
    assert {b.attacker: b.defense for b in d2.best_defenses}["adaptive"] == "weak"
    for c in r.cells:  # every defense now helps the thief: no best defense, though "weak" keeps 45 dB
        if c.defense != "none" and c.fidelity is not None:
            c.fidelity = _comp([49.0, 51.0])  # above every undefended cell (about 30-32 dB)
    assert {b.attacker: b.defense for b in derive(r).best_defenses} == {"plain": None, "adaptive": None}


def test_a_tiny_campaign_with_plain_and_adaptive_attackers_runs_end_to_end(tmp_path: Path) -> None:
    cfg = tmp_path / "pert.toml"
    cfg.write_text("# tiny perturbation-style campaign\n" + BASE.replace("budgets = [4, 8]", "budgets = [4]"))
    out = tmp_path / "out"
    res = subprocess.run([sys.executable, "-m", "heist.cli.main", "campaign", "run", str(cfg), "--out", str(out)],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "200"})
    assert res.returncode == 0, res.stderr[-3000:]
    r = read_results(out / "results.json")
    cells = {(c.defense, c.attacker): c for c in r.extraction_cells}
    assert set(cells) == {(d, a) for d in ("none", "noise") for a in ("plain", "adaptive")}
    for (_, who), c in cells.items():
        assert c.status == "done", c.error
        assert c.queries_used == 4, "one harvest serves every counter-measure of the adaptive attacker"
        if who == "adaptive":
            assert set(c.counter_fidelity) == {"lowpass:sigma=1.0", "median"}
            assert c.counter == max(c.counter_fidelity, key=lambda k: c.counter_fidelity[k])
            assert c.fidelity.mean("psnr") == pytest.approx(c.counter_fidelity[c.counter], abs=1e-3)
            assert Path(c.surrogate.path).parent.name.startswith("surrogate-")
        else:
            assert c.counter is None
            assert not c.counter_fidelity
    rows = {(x.defense, x.attacker): x for x in r.derived.attacker_table}
    for who in ("plain", "adaptive"):
        want = cells[("none", who)].fidelity.mean("psnr") - cells[("noise", who)].fidelity.mean("psnr")
        assert rows[("noise", who)].loss_db["4"] == pytest.approx(want)
    honest = rows[("noise", "plain")].honest_psnr
    assert 25.0 < honest < 40.0  # noise sigma 0.03 ~ 30.5 dB
    md = (out / "report.md").read_text()
    assert "## Defenses against plain and adaptive attackers" in md
    section = md.split("## Defenses against plain and adaptive attackers")[1].split("\n## ")[0]
    row = next(line for line in section.splitlines() if line.startswith("| denoise25 | noise |"))
    assert f"{honest:.2f}" in row
    assert f"{rows[('noise', 'adaptive')].loss_db['4']:.2f}" in row
    assert "none: no defense with honest PSNR >= 40 dB" in md  # the only defense costs honest users ~30 dB
    figs = re.findall(r"\(figures/(attackers_pareto_[^)]+\.png)\)", md)
    assert figs == ["attackers_pareto_denoise25.png"]
    assert (out / "figures" / figs[0]).stat().st_size > 1000
