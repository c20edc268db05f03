"""``heist campaign run --executor ray``: a local Ray instance (2 CPUs) on a trimmed tiny campaign gives the
sequential executor's numbers, a SIGKILLed Ray worker's cell is retried, membership cells (another kind)
score the same both ways, and a missing Ray or an unreachable cluster is one error line before any cell runs."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from evaluation.results import read_results

ROOT = Path(__file__).resolve().parents[1]
# configs/campaigns/tiny.toml with one defense, 20 training steps and no sample grids: two cells (budgets 2, 8)
TINY2 = (ROOT / "configs" / "campaigns" / "tiny.toml").read_text().replace(
    '[[defenses]]\nlabel = "jpeg50"\npipeline = [{ name = "jpeg", quality = 50 }]\n', "").replace(
    "train_steps = 40", "train_steps = 20").replace("samples = 2", "samples = 0")
PSNR_TOLERANCE_DB = 0.05  # documented in docs/evaluation.md ("Campaign grids on Ray")


def _heist(args: list[str], env: dict[str, str] | None = None, timeout: float = 600,
           ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "heist.cli.main", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "COLUMNS": "200", **(env or {})}, cwd=ROOT)


def _ray_workers_running_a_cell() -> list[int]:
    """Pids of Ray worker processes executing a cell (Ray titles them ``ray::_in_ray_worker``)."""
    pids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if (p / "cmdline").read_bytes().startswith(b"ray::_in_ray_worker"):
                    pids.append(int(p.name))
            except OSError:
                continue
    return pids


def test_unreachable_ray_address_is_one_line_before_any_cell(tmp_path: Path) -> None:
    out = tmp_path / "out"
    res = _heist(["campaign", "run", "configs/campaigns/tiny.toml", "--out", str(out), "--executor", "ray",
                  "--address", "127.0.0.1:1"], timeout=120)
    assert res.returncode == 2
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    assert "cannot reach the Ray cluster at 127.0.0.1:1" in lines[0]
    assert "i2i-heist[ray]" in lines[0]
    assert not out.exists()


def test_missing_ray_names_the_extra(tmp_path: Path) -> None:
    shadow = tmp_path / "noray" / "ray"  # an installation whose ray cannot be imported
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('ray is not installed here')\n")
    out = tmp_path / "out"
    res = _heist(["campaign", "run", "configs/campaigns/tiny.toml", "--out", str(out), "--executor", "ray"],
                 env={"PYTHONPATH": os.pathsep.join([str(shadow.parent), str(ROOT)])}, timeout=120)
    assert res.returncode == 2
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    assert "pip install 'i2i-heist[ray]'" in lines[0]
    assert not out.exists()


@pytest.mark.slow
def test_ray_matches_sequential_and_retries_a_killed_worker(tmp_path: Path) -> None:
    cfg = tmp_path / "tiny2.toml"
    assert all(s in TINY2 for s in ("train_steps = 20", "samples = 0"))
    assert "jpeg50" not in TINY2
    cfg.write_text(TINY2)
    seq_out, ray_out = tmp_path / "seq", tmp_path / "ray"
    t0 = time.perf_counter()
    res = _heist(["campaign", "run", str(cfg), "--out", str(seq_out)])
    seq_s = time.perf_counter() - t0
    assert res.returncode == 0, res.stderr[-3000:]

    killed: list[int] = []

    def status(cell_json: Path) -> str:
        try:
            return str(json.loads(cell_json.read_text()).get("status", ""))
        except (OSError, ValueError):
            return ""

    def kill_a_worker_mid_cell() -> None:
        """SIGKILL the Ray workers while a cell runs; a kill that landed after the cell finished is retried."""
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline:
            running = [c for c in ray_out.glob("cells/*/cell.json") if status(c) == "running"]
            pids = _ray_workers_running_a_cell()
            if running and pids:
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                        killed.append(pid)
                if any(status(c) == "running" for c in running):  # interrupted, not finished: Ray retries it
                    return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_a_worker_mid_cell, daemon=True)
    killer.start()
    t0 = time.perf_counter()
    res = _heist(["campaign", "run", str(cfg), "--out", str(ray_out), "--executor", "ray"])
    ray_s = time.perf_counter() - t0
    killer.join(timeout=5)
    assert res.returncode == 0, res.stderr[-3000:]
    assert killed, "no Ray worker was seen running a cell"
    attempts = {p.parent.name: int(p.read_text()) for p in ray_out.glob("cells/*/attempts")}
    assert max(attempts.values()) >= 2, attempts  # the killed worker's cell ran again
    seq, ray = read_results(seq_out / "results.json"), read_results(ray_out / "results.json")
    assert [c.id for c in ray.cells] == [c.id for c in seq.cells]
    assert [c.status for c in ray.cells] == ["done", "done"]
    for a, b in zip(seq.cells, ray.cells, strict=True):
        assert a.queries_used == b.queries_used
        for m in ("psnr", "ssim"):
            sa, sb = a.fidelity.metrics[m].summary.mean, b.fidelity.metrics[m].summary.mean
            tol = PSNR_TOLERANCE_DB if m == "psnr" else 1e-3
            assert abs(sa - sb) <= tol, (a.id, m, sa, sb)
    assert (ray_out / "report.html").exists()
    assert ray.wall_times["training"] > 0  # the cells' phase times are summed into the campaign's
    print(json.dumps({"sequential_s": round(seq_s, 1), "ray_s": round(ray_s, 1), "attempts": attempts}))  # noqa: T201


MIA = """[campaign]
name = "mia-ray"
zoo_profile = "tiny"

[limits]      # generous: this test is about the executor, not about how the attack paces itself
rate = 1000.0
burst = 100

[[victims]]
name = "mia-edges"

[[defenses]]
label = "none"

[[cells]]
kind = "membership"
victim = "mia-edges"
reference_steps = 0

[evaluation]
max_side = 64
samples = 0
"""


@pytest.mark.slow
def test_membership_cells_run_on_ray_with_the_sequential_numbers(tmp_path: Path) -> None:
    """Cells of another kind go through the same executor: the membership cell's scores match exactly (the
    clean tier is deterministic; a noise tier would not be, its noise is keyed by each run's own secrets)."""
    cfg = tmp_path / "mia.toml"
    cfg.write_text(MIA)
    runs = {}
    for name, extra in (("seq", []), ("ray", ["--executor", "ray"])):
        res = _heist(["campaign", "run", str(cfg), "--out", str(tmp_path / name), *extra])
        assert res.returncode == 0, res.stderr[-3000:]
        runs[name] = read_results(tmp_path / name / "results.json")
        assert (tmp_path / name / "cells" / "mia.mia-edges.none.none" / "attempts").read_text() == "1"
    seq, ray = runs["seq"].membership_cells, runs["ray"].membership_cells
    assert [(c.id, c.status) for c in ray] == [(c.id, c.status) for c in seq] == [("mia.mia-edges.none.none", "done")]
    assert ray[0].queries_used == seq[0].queries_used > 0
    assert ray[0].scores == seq[0].scores
    assert ray[0].utility == seq[0].utility
    assert runs["ray"].wall_times["attack"] > 0  # the cell's own phase time, summed into the campaign's
