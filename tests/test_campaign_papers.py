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


def test_validate_takes_a_profile_on_the_command_line() -> None:
    """``heist campaign validate FILE --profile NAME`` (``run`` takes the same option; every profile of
    both files is validated in-process above)."""
    res = _run(["campaign", "validate", str(SINGLE), "--profile", "tiny"], 120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "ok: 5 cells" in res.stdout  # the tiny profile: 5 victims x 1 budget
    res = _run(["campaign", "validate", str(SZYLLER), "--profile", "huge"], 120)
    assert res.returncode == 2
    assert "no profile 'huge'" in res.stderr


def test_paper_needs_extraction_cells() -> None:
    text = _PAPER_TINY.replace("[attack]\nbudgets = [1, 2]\nstrategies = [\"crops\"]\n"
                               "strategy_params = { crop_size = 64 }\n", "")
    text = text.replace("[[defenses]]", "[[victims]]\nname = \"mia-edges\"\n\n[[cells]]\nkind = \"membership\"\n"
                        "victim = \"mia-edges\"\n\n[[defenses]]", 1)
    with pytest.raises(CampaignConfigError, match="paper: rows and extraction tables compare extraction cells"):
        parse_campaign(text)


# The paper machinery in CI size, on the tiny denoise25 victim the other campaign tests build too: the single-
# example file's denoising rows (large vs small receptive field) plus the extraction paper's A/B/C table
# with Welch + TOST. The two files themselves run in their tiny form at the end of this module.
_PAPER_TINY = """
[campaign]
name = "paper-tiny"
zoo_profile = "tiny"

[limits]
rate = 200.0
burst = 50

[[victims]]
name = "denoise25"
surrogate = "resunet"
surrogate_profile = "tiny"
train_steps = 25

[[victims]]
name = "denoise25-rf-small"
recipe = "denoise25"
surrogate = "resunet"
surrogate_profile = "tiny"
surrogate_kwargs = { levels = 0, convs = 2 }
train_steps = 25

[[defenses]]
label = "none"

[attack]
budgets = [1, 2]
strategies = ["crops"]
strategy_params = { crop_size = 64 }

[evaluation]
max_side = 64
samples = 0
d_bound = 0.3

[paper]
source = "Spingarn-Eliezer, Michaeli (single example) and Szyller et al. (A/B/C tables)"
extraction = ["denoise25"]

[[paper.rows]]
label = "denoising, one example"
victim = "denoise25"
budget = 1
paper = "> 31 (often)"

[[paper.rows]]
label = "denoising, small receptive field, one example"
victim = "denoise25-rf-small"
budget = 1
paper = "lower than the large field (Fig. 3a)"

[[paper.rows]]
label = "A: victim vs ground truth"
victim = "denoise25"
cell = "A"
paper = 24.67

[[paper.rows]]
label = "C: surrogate vs ground truth"
victim = "denoise25"
cell = "C"
metric = "ssim"
paper = "0.80 +- 0.20"

[[paper.rows]]
label = "B FID"
victim = "denoise25"
cell = "B"
metric = "fid"
paper = 15.38
"""


@pytest.fixture(scope="module")
def paper_tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from evaluation.campaign.runner import run_campaign

    root = tmp_path_factory.mktemp("paper")
    cfg = root / "paper-tiny.toml"
    cfg.write_text(_PAPER_TINY)
    return run_campaign(cfg, out_dir=root / "out")


@pytest.mark.slow
def test_paper_rows_beside_ours_and_abc_tables(paper_tiny: Path) -> None:
    r = read_results(paper_tiny)
    assert {c.status for c in r.extraction_cells} == {"done"}
    assert len(r.extraction_cells) == 4  # 2 victims x 1 defense x 1 strategy x 2 budgets
    assert [t.victim.name for t in r.extraction] == ["denoise25"]
    tests = r.extraction[0].test_sets[0].tests
    assert tests["psnr"].tost.d_bound == pytest.approx(0.3)
    assert tests["psnr"].welch is not None
    assert {"A", "B", "C"} <= set(r.extraction[0].test_sets[0].cells)
    assert (r.paper_source or "").startswith("Spingarn-Eliezer")
    rows = {p.label: p for p in r.paper}
    one = rows["denoising, one example"]
    cell = next(c for c in r.extraction_cells if c.victim == "denoise25" and c.budget == 1)
    assert one.budget == 1
    assert one.ours == pytest.approx(cell.fidelity.mean("psnr"), abs=1e-3)  # type: ignore[union-attr]
    assert rows["A: victim vs ground truth"].ours is not None
    c_row = rows["C: surrogate vs ground truth"]
    assert c_row.budget == 2  # no budget given: the largest
    assert 0 < c_row.ours <= 1  # type: ignore[operator]
    fid = rows["B FID"]
    assert fid.ours is None
    assert "no feature network" in fid.note
    report = (paper_tiny.parent / "report.md").read_text()
    assert "The paper's numbers beside ours" in report
    assert "0.80 +- 0.20" in report


@pytest.mark.slow
def test_cells_record_query_pixels_and_receptive_fields(paper_tiny: Path) -> None:
    r = read_results(paper_tiny)
    one = {c.victim: c for c in r.extraction_cells if c.budget == 1}
    assert all(c.input_pixels == 64 * 64 for c in one.values())
    assert all(c.surrogate_kind == "resunet" for c in r.extraction_cells)
    # 0 down-sampling levels see far less context than the tiny profile's depth
    assert one["denoise25-rf-small"].receptive_field < one["denoise25"].receptive_field  # type: ignore[operator]
    assert "Fidelity vs query pixels and receptive field" in (paper_tiny.parent / "report.md").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("path", [SINGLE, SZYLLER])
def test_the_campaign_files_run_in_their_tiny_form(path: Path, tmp_path: Path) -> None:
    """Each reproduction file end to end in its ``tiny`` profile (tiny zoo victims built on the way, about a
    minute on 2 cores): every cell done, every paper row has our number beside the paper's, report rendered."""
    out = tmp_path / path.stem
    res = _run(["campaign", "run", str(path), "--profile", "tiny", "--out", str(out)])
    assert res.returncode == 0, res.stderr[-3000:]
    r = read_results(out / "results.json")
    assert r.cells
    assert all(c.status == "done" for c in r.cells), [(c.id, c.error) for c in r.cells]
    cfg, _ = load_campaign(path, "tiny")
    assert cfg.paper is not None
    assert len(r.paper) == len(cfg.paper.rows)
    assert all(row.paper for row in r.paper)
    assert all(row.ours is not None for row in r.paper if row.metric in ("psnr", "ssim")), r.paper
    assert "The paper's numbers beside ours" in (out / "report.md").read_text()
