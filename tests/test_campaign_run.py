"""A tiny campaign end to end through the real HTTP service: results, report, resume after a kill."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from evaluation.results import read_results

TINY = Path("configs/campaigns/tiny.toml")


def _run(args: list[str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "heist.cli.main", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "COLUMNS": "200"})


def _fmt(x: float, digits: int) -> str:
    return f"{x:.{digits}f}"


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("campaign") / "tiny"
    res = _run(["campaign", "run", str(TINY), "--out", str(out)])
    assert res.returncode == 0, res.stderr[-3000:]
    assert "report:" in res.stdout
    return out


@pytest.mark.slow
def test_every_cell_ran_through_the_http_api(finished: Path) -> None:
    results = read_results(finished / "results.json")
    assert results.kind == "campaign"
    assert len(results.cells) == 4  # 1 victim x 2 defenses x 2 budgets x 1 strategy
    steps = tomllib.loads(TINY.read_text())["victims"][0]["train_steps"]
    assert {c.status for c in results.cells} == {"done"}
    for cell in results.cells:
        assert cell.queries_used == cell.budget
        harvest_log = Path(cell.run_dir or "") / "harvest_log.jsonl"
        statuses = [json.loads(line)["status"] for line in harvest_log.read_text().splitlines()]
        assert statuses.count(200) == cell.budget
        assert cell.fidelity is not None
        assert cell.fidelity.metrics["psnr"].summary.mean > 10
        assert Path(cell.surrogate.path).exists()  # type: ignore[union-attr]
        # tiny.toml gives a step count and the default 300 s budget: the steps are what ran, and they stopped there
        assert cell.training is not None
        assert cell.training.steps == steps, cell.training
        assert cell.training.stop_reason == "steps", cell.training
        assert cell.training.time_budget_s == 300.0
    # The JPEG defense changed what honest users get; the clean tier is identical to itself.
    util = {u.defense: u for u in results.utility}
    assert util["none"].defended_vs_clean.metrics["psnr"].summary.mean == pytest.approx(80.0)
    assert util["jpeg50"].defended_vs_clean.metrics["psnr"].summary.mean < 40.0
    assert results.wall_times["total"] > 0
    assert results.peak_memory_mb is not None
    assert results.peak_memory_mb > 0
    assert results.derived is not None
    assert results.derived.curves


@pytest.mark.slow
def test_report_numbers_come_from_results_json(finished: Path) -> None:
    results = read_results(finished / "results.json")
    md = (finished / "report.md").read_text()
    html = (finished / "report.html").read_text()
    for cell in results.cells:
        psnr = cell.fidelity.metrics["psnr"].summary.mean  # type: ignore[union-attr]
        row = next(line for line in md.splitlines() if line.startswith(f"| {cell.id} |"))
        assert _fmt(psnr, 2) in row
        assert _fmt(psnr, 2) in html
        assert cell.training is not None
        assert cell.training.describe() in row  # the machine-dependent part of the cell, named in the report
    for u in results.utility:
        row = next(line for line in md.splitlines() if line.startswith(f"| {u.defense} |"))
        assert _fmt(u.defended_vs_clean.metrics["psnr"].summary.mean, 2) in row
    assert "FID/KID not computed" in md  # says which feature network (none) produced FID/KID
    for fig in re.findall(r"\(figures/([^)]+\.png)\)", md):
        assert (finished / "figures" / fig).stat().st_size > 1000
    assert "<img" in html
    assert "data:image/png;base64," in html


@pytest.mark.slow
def test_resume_after_kill_skips_finished_cells(tmp_path: Path) -> None:
    out = tmp_path / "tiny"
    proc = subprocess.Popen([sys.executable, "-m", "heist.cli.main", "campaign", "run", str(TINY), "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    first = out / "cells" / "denoise25.none.crops.b2" / "cell.json"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if first.exists() and json.loads(first.read_text())["status"] == "done":
            break
        assert proc.poll() is None, "the campaign ended before it could be killed"
        time.sleep(0.2)
    else:
        pytest.fail("the first cell never finished")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    done_before = {p.parent.name: p.stat().st_mtime_ns for p in (out / "cells").glob("*/cell.json")
                   if json.loads(p.read_text())["status"] == "done"}
    assert "denoise25.none.crops.b2" in done_before
    assert not (out / "results.json").exists()

    res = _run(["campaign", "run", str(TINY), "--out", str(out)])
    assert res.returncode == 0, res.stderr[-3000:]
    results = read_results(out / "results.json")
    assert [c.status for c in results.cells] == ["done"] * 4
    for name, mtime in done_before.items():
        assert (out / "cells" / name / "cell.json").stat().st_mtime_ns == mtime, f"{name} was run again"


_DYING = """
[campaign]
name = "dying"
zoo_profile = "tiny"

[limits]        # slow enough that the first harvest is still running when the victim is killed
rate = 2.0
burst = 1
quota_total = 100

[[victims]]
name = "denoise25"
surrogate = "unet-l2"
surrogate_profile = "tiny"
train_steps = 20

[[defenses]]
label = "none"

[[defenses]]
label = "jpeg50"
pipeline = [{ name = "jpeg", quality = 50 }]

[attack]
budgets = [8]
strategies = ["crops"]

[evaluation]
max_side = 64
samples = 1
"""


@pytest.mark.slow
def test_victim_killed_mid_harvest_fails_only_that_cell_and_a_rerun_retries_it(tmp_path: Path) -> None:
    config = tmp_path / "dying.toml"
    config.write_text(_DYING)
    out = tmp_path / "dying"
    proc = subprocess.Popen([sys.executable, "-m", "heist.cli.main", "campaign", "run", str(config), "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "COLUMNS": "200"})
    first, second = "denoise25.none.crops.b8", "denoise25.jpeg50.crops.b8"
    log = out / "cells" / first / "run" / "harvest_log.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if log.exists() and sum('"status": 200' in line or '"status":200' in line
                                for line in log.read_text().splitlines()) >= 2:
            break
        assert proc.poll() is None, "the campaign ended before its victim could be killed"
        time.sleep(0.05)
    else:
        proc.kill()
        pytest.fail("the first harvest never got going")
    victim_pid = int((out / "victim" / "server.pid").read_text())
    os.killpg(victim_pid, signal.SIGKILL)  # the victim and its workers, mid-harvest
    stdout, stderr = proc.communicate(timeout=600)

    # The killed cell failed with its reason, the other one ran on a restarted victim, the run says so.
    assert proc.returncode == 1, stderr[-3000:]
    assert "1 cell(s) failed" in stdout
    cells = {p.parent.name: json.loads(p.read_text()) for p in (out / "cells").glob("*/cell.json")}
    assert cells[first]["status"] == "failed"
    assert "connection" in cells[first]["error"].lower() or "unreachable" in cells[first]["error"].lower()
    assert cells[second]["status"] == "done"
    assert "restarting it" in stderr
    results = read_results(out / "results.json")
    assert {c.id: c.status for c in results.cells} == {first: "failed", second: "done"}
    assert "failed" in (out / "report.md").read_text()
    second_mtime = (out / "cells" / second / "cell.json").stat().st_mtime_ns

    # A rerun retries only the failed cell; its harvest resumes from the pairs already stored.
    res = _run(["campaign", "run", str(config), "--out", str(out)])
    assert res.returncode == 0, res.stderr[-3000:]
    results = read_results(out / "results.json")
    assert {c.id: c.status for c in results.cells} == {first: "done", second: "done"}
    assert (out / "cells" / second / "cell.json").stat().st_mtime_ns == second_mtime
    retried = next(c for c in results.cells if c.id == first)
    assert retried.queries_used == 8
