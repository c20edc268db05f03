"""``heist campaign``: validate, run (or resume) a campaign and render its report."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

import typer

from heist.cli.common import console, err_console, progress

if TYPE_CHECKING:
    from evaluation.campaign.executors import CellExecutor

SIGTERM_EXIT = 128 + signal.SIGTERM  # the shell's status of a process ended by SIGTERM (143)


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived (``timeout``, ``docker stop``, a CI cancel). A :class:`KeyboardInterrupt`, so everything
    that cleans up after Ctrl-C (the campaign's victim server, the executor) does so after SIGTERM too."""


@contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """Within the block SIGTERM raises :class:`Terminated` in the main thread; a second SIGTERM while the
    cleanup runs is ignored (SIGKILL still ends it). The previous handler comes back afterwards."""

    def handler(signum: int, frame: FrameType | None) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)

app = typer.Typer(help="Attack/defense campaigns: a grid of victims x defenses x budgets x strategies from one file.",
                  no_args_is_help=True)


@app.command("validate")
def validate(
    config: Path = typer.Argument(..., help="Campaign TOML file."),
    profile: str = typer.Option(None, "--profile", help="Check the file with its \\[profiles.NAME] applied."),
    victim_url: str = typer.Option(None, "--victim-url", help="Check it as `run --victim-url URL` would run it."),
) -> None:
    """Check a campaign file without running anything (mistakes are reported with their line)."""
    from evaluation.campaign.config import load_campaign
    from evaluation.campaign.kinds import CELL_KINDS

    cfg, _ = load_campaign(config, profile, victim_url=victim_url)
    counts = {e.kind: len(CELL_KINDS[e.kind].plan(cfg, e)) for e in cfg.entries()}
    kinds = ", ".join(f"{n} {k}" for k, n in counts.items())
    console.print(f"{config}: ok: {sum(counts.values())} cells ({kinds}) -> {cfg.out_dir}")


@app.command("run")
def run(
    config: Path = typer.Argument(..., help="Campaign TOML file (see configs/campaigns/)."),
    victim_url: str = typer.Option(None, "--victim-url", help="Attack this running service instead of starting one."),
    out: Path = typer.Option(None, "--out", help="Output folder (default: \\[campaign].out_dir or runs/NAME)."),
    executor: str = typer.Option("sequential", "--executor", help="sequential (this process) or ray (extra 'ray')."),
    address: str = typer.Option(None, "--address", help="Ray cluster address (default: start a local Ray)."),
    cpus_per_cell: float = typer.Option(1.0, "--cpus-per-cell", min=0.0, help="Ray: CPUs each cell declares."),
    gpus_per_cell: float = typer.Option(0.0, "--gpus-per-cell", min=0.0,
                                        help="Ray: GPUs each cell declares (fractions share a GPU)."),
    retries: int = typer.Option(1, "--retries", min=0, help="Ray: resubmissions of a cell that failed."),
    profile: str = typer.Option(None, "--profile", help="Apply the file's \\[profiles.NAME] overrides (e.g. full)."),
) -> None:
    """Run the campaign (resuming finished cells), then write results.json, report.md and report.html."""
    from evaluation.campaign.config import load_campaign
    from evaluation.campaign.executors import make_executor

    load_campaign(config, profile, victim_url=victim_url)  # mistakes are reported before a Ray cluster is contacted
    try:
        with sigterm_interrupts():
            path, failed = _run(config, victim_url, out, profile,
                                make_executor(executor, address, cpus_per_cell=cpus_per_cell,
                                              gpus_per_cell=gpus_per_cell, retries=retries))
    except Terminated:
        err_console.print("[yellow]terminated[/yellow] (SIGTERM): stopped cleanly; run the same command again "
                          "to resume")
        raise typer.Exit(SIGTERM_EXIT) from None
    for f in failed:
        console.print(f"[red]failed[/red] {f}", highlight=False)
    console.print(f"results: {path}")
    console.print(f"report:  {path.parent / 'report.html'}  (and report.md, figures/)")
    if failed:
        console.print(f"{len(failed)} cell(s) failed; run the same command again to retry only those.")
        raise typer.Exit(1)


def _run(config: Path, victim_url: str | None, out: Path | None, profile: str | None,
         cells: CellExecutor) -> tuple[Path, list[str]]:
    """Run the campaign under a progress bar; returns ``results.json`` and the failed cells (``ID: error``)."""
    from evaluation.campaign.runner import CampaignHooks, run_campaign

    failed: list[str] = []
    try:
        with progress() as bar:
            task = bar.add_task("attack cells", total=None, info="")

            def cell_done(cell: object) -> None:
                status = getattr(cell, "status", "")
                if status == "failed":
                    failed.append(f"{getattr(cell, 'id', '?')}: {getattr(cell, 'error', '')}")
                bar.advance(task)

            hooks = CampaignHooks(
                cells=lambda total: bar.update(task, total=total),
                cell_done=cell_done,
                say=lambda text: bar.update(task, info=text[:70]),
            )
            path = run_campaign(config, victim_url=victim_url, out_dir=out, hooks=hooks, executor=cells,
                                profile=profile)
    finally:
        cells.close()
    return path, failed


@app.command("report")
def report(results: Path = typer.Argument(..., help="results.json or its folder.")) -> None:
    """Re-render report.md / report.html / figures from a campaign's results.json."""
    from evaluation.report import render_report

    files = render_report(results)
    console.print(f"report: {files.html} and {files.markdown}")
