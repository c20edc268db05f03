"""The source papers' campaign files: profiles, paper rows beside ours, A/B/C tables, tiny forms end to end."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from evaluation.campaign.config import CampaignConfigError, load_campaign, parse_campaign
from evaluation.results import read_results

SZYLLER = Path("configs/campaigns/szyller-extraction.toml")
SINGLE = Path("configs/campaigns/single-example.toml")


def _run(args: list[str], timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "heist.cli.main", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1"})


@pytest.mark.parametrize("path", [SZYLLER, SINGLE])
def test_profiles_merge_into_the_file(path: Path) -> None:
    cpu, _ = load_campaign(path)
    tiny, _ = load_campaign(path, "tiny")
    full, _ = load_campaign(path, "full")
    assert cpu.campaign.zoo_profile == "default"
    assert tiny.campaign.zoo_profile == "tiny"
    assert full.campaign.zoo_profile == "full"
    assert [v.name for v in tiny.victims] == [v.name for v in cpu.victims] == [v.name for v in full.victims]
    assert all(v.surrogate_profile == "tiny" and v.train_steps for v in tiny.victims)
    assert cpu.paper is not None
    assert cpu.paper.rows
    with pytest.raises(CampaignConfigError, match="no profile 'huge'"):
        load_campaign(path, "huge")


def test_paper_rows_must_name_a_victim() -> None:
    text = SZYLLER.read_text().replace('victim = "style-ink"\ncell = "B"\nmetric = "fid"',
                                       'victim = "nobody"\ncell = "B"\nmetric = "fid"')
    with pytest.raises(CampaignConfigError, match="'nobody' is not one of the victims"):
        parse_campaign(text, SZYLLER)


@pytest.mark.slow
def test_szyller_tiny_form_reports_abc_tables_beside_the_paper(tmp_path: Path) -> None:
    res = _run(["campaign", "run", str(SZYLLER), "--profile", "tiny", "--out", str(tmp_path / "sz")])
    assert res.returncode == 0, res.stderr[-3000:]
    r = read_results(tmp_path / "sz" / "results.json")
    assert {c.status for c in r.cells} == {"done"}
    assert [t.victim.name for t in r.extraction] == ["sr4x", "style-ink"]
    for table in r.extraction:
        tests = table.test_sets[0].tests
        assert tests["psnr"].tost.d_bound == pytest.approx(0.3)
        assert tests["psnr"].welch is not None
        assert {"A", "B", "C"} <= set(table.test_sets[0].cells)
    rows = {p.label: p for p in r.paper}
    assert rows["SR Table 4b, DIV2K test: B"].paper == "24.74 +- 9.21"
    assert rows["SR Table 4b, DIV2K test: B"].ours is not None
    assert rows["SR Table 4b, DIV2K test: A"].ours is not None
    fid = rows["Monet-to-Photo Table 2, benchmark (Landscape): B"]
    assert fid.ours is None
    assert "no feature network" in fid.note
    report = (tmp_path / "sz" / "report.md").read_text()
    assert "The paper's numbers beside ours" in report
    assert "24.74 +- 9.21" in report


@pytest.mark.slow
def test_single_example_tiny_form_measures_pixels_and_receptive_fields(tmp_path: Path) -> None:
    res = _run(["campaign", "run", str(SINGLE), "--profile", "tiny", "--out", str(tmp_path / "se")])
    assert res.returncode == 0, res.stderr[-3000:]
    r = read_results(tmp_path / "se" / "results.json")
    assert {c.status for c in r.cells} == {"done"}
    cells = {c.victim: c for c in r.cells}
    assert all(c.input_pixels == 64 * 64 for c in cells.values())
    assert all(c.surrogate_kind == "resunet" for c in cells.values())
    # 0 down-sampling levels see far less context than 2 (the tiny profile's depth)
    assert cells["denoise25-rf-small"].receptive_field < cells["denoise25"].receptive_field
    assert [p.ours is not None for p in r.paper] == [True] * len(r.paper)
    report = (tmp_path / "se" / "report.md").read_text()
    assert "Fidelity vs query pixels and receptive field" in report
