"""Run a campaign: zoo (+ model-level defenses) -> victim service -> every entry's cells -> report.

Each entry of the campaign file (``[attack]`` = extraction, ``[[cells]]`` of any kind) is handled by its
:class:`~evaluation.campaign.kinds.base.CellKind`: the runner builds the models the kinds ask to serve,
starts (or targets) the victim service with one API key per cell, then runs each entry's cells through
the kind: ``prepare``, one picklable :class:`~evaluation.campaign.kinds.base.CellTask` per pending cell
mapped by the executor (:mod:`evaluation.campaign.executors`: this process, or Ray tasks), ``finish``.
Cell state lives in ``OUT/cells/ID/cell.json``; a rerun skips finished cells, retries failed
ones, and the work inside a cell resumes where a kill left it, as long as the cell's settings are those it
was saved with (``OUT/cells/ID/fingerprint.json``, :mod:`evaluation.campaign.fingerprint`): a cell whose
settings changed is cleared and run again. ``results.json`` is rebuilt from the cell files at the end of
every run, and the report is rendered from it; its times add up every run of the campaign
(:mod:`evaluation.campaign.ledger`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import resource
import shlex
import shutil
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from pydantic import TypeAdapter

from evaluation.campaign.config import CampaignConfig, CampaignConfigError, load_campaign
from evaluation.campaign.executors import CellExecutor, SequentialExecutor
from evaluation.campaign.fingerprint import judge, previous_run, write_stamp
from evaluation.campaign.kinds import CELL_KINDS
from evaluation.campaign.kinds.base import (
    CellPaths,
    CellPlan,
    CellTask,
    RunContext,
    failed_cell,
    feature_network,
    run_cell,
)
from evaluation.campaign.kinds.extraction import cell_id
from evaluation.campaign.ledger import Ledger, campaign_times, folder_campaign
from evaluation.campaign.victim import VictimKeys, victim_settings
from evaluation.defense_scoring import derive
from evaluation.metrics import MetricSettings
from evaluation.report import render_report
from evaluation.results import AnyCell, Environment, Results, write_results
from translators.device import pick_device
from translators.errors import HeistError
from translators.files import unusable_folder_reason

__all__ = ["CampaignError", "CampaignHooks", "cell_id", "run_campaign"]

log = logging.getLogger(__name__)


class CampaignError(HeistError):
    code = "campaign_failed"


@dataclass
class CampaignHooks:
    """Optional callbacks for a progress display: ``cells(total)``, ``cell_done(cell)``, ``say(text)``."""

    cells: Callable[[int], None] = lambda total: None
    cell_done: Callable[[AnyCell], None] = lambda cell: None
    say: Callable[[str], None] = lambda text: log.info(text)


@dataclass
class _Timer:
    """Run-level phase times of this invocation; ``on_change`` is called after each phase (to save them)."""

    totals: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    on_change: Callable[[], None] = lambda: None

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.totals[name] += time.perf_counter() - t0
            self.on_change()


def _peak_memory_mb() -> float:
    """Peak resident memory of this process plus its largest finished child, MiB (Linux ru_maxrss is KiB)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return round((own + kids) / 1024, 1)


class _Service:
    """The victim: a given URL, or a ``heist serve`` subprocess this campaign starts (and restarts if it dies)."""

    def __init__(self, cfg: CampaignConfig, out: Path, url: str | None, models: dict[str, str],
                 cells: dict[str, str]) -> None:
        self.cfg, self.out, self.given_url = cfg, out, url
        self.models, self.cells = models, cells
        self.keys = VictimKeys.load_or_create(out / "victim" / "keys.json")
        self.proc: Any = None

    def start(self) -> str:
        if self.given_url:
            return self.given_url.rstrip("/")
        from victim_service.process import start_service
        from victim_service.settings import Settings

        vdir = self.out / "victim"
        vdir.mkdir(parents=True, exist_ok=True)
        data = victim_settings(self.cfg, self.models, self.keys, self.cells, vdir / "data")
        self.keys.save(vdir / "keys.json")
        settings_path = vdir / "settings.json"
        Settings.from_mapping(data, str(settings_path)).to_json_file(settings_path)
        svc = self.cfg.victim_service
        pid_file = vdir / "server.pid"
        _kill_stale_server(pid_file, settings_path)
        self.proc = start_service(settings_path, workers=svc.workers, log_path=vdir / "server.log",
                                  ready_timeout=svc.startup_timeout_s)
        pid_file.write_text(str(self.proc.pid))
        return str(self.proc.url)

    def ensure(self, url: str) -> str:
        """The URL of a live victim: restarts a self-started service that died."""
        if self.proc is not None and not self.proc.alive():
            log.warning("the victim service died (see %s); restarting it", self.out / "victim" / "server.log")
            return self.start()
        return url

    def honest_key(self, label: str) -> str:
        d = next(d for d in self.cfg.defenses if d.label == label)
        return d.api_key or self.keys.honest[label]

    def attack_key(self, cid: str, label: str) -> str:
        d = next(d for d in self.cfg.defenses if d.label == label)
        return d.api_key or self.keys.attack[cid]

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
            self.proc = None
            (self.out / "victim" / "server.pid").unlink(missing_ok=True)


def _kill_stale_server(pid_file: Path, settings_path: Path) -> None:
    """Stop a victim server left running by a campaign that was killed (its pid file survived it)."""
    import os
    import signal

    try:
        pid = int(pid_file.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except (OSError, ValueError):
        return
    if "victim_service.app" not in cmdline:
        return  # the pid was reused by something else
    log.warning("stopping the victim server (pid %d) left by an interrupted run", pid)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def _load_cell(path: Path) -> AnyCell | None:
    """The saved record of a cell; None when there is none, or when it is unreadable (said in a warning:
    the cell then runs again)."""
    if not path.exists():
        return None
    try:
        raw = json.loads(path.read_text())
        if not isinstance(raw, dict):
            raise ValueError("not a JSON object")
        return TypeAdapter(AnyCell).validate_python({"kind": "extraction", **raw})  # v1 cells had no kind
    except (OSError, ValueError) as exc:
        log.warning("%s is unreadable (%s); the cell runs again", path, str(exc).splitlines()[0][:200])
        return None


def run_campaign(
    config_path: str | Path,
    *,
    victim_url: str | None = None,
    out_dir: str | Path | None = None,
    hooks: CampaignHooks | None = None,
    profile: str | None = None,
    executor: CellExecutor | None = None,
) -> Path:
    """Run (or resume) the campaign in ``config_path``; returns the path of ``results.json``.

    ``victim_url`` overrides ``[victim_service].url``; ``profile`` applies ``[profiles.NAME]``. ``executor``
    runs the cells (default: one after another in this process; see :mod:`evaluation.campaign.executors`).
    Raises :class:`CampaignConfigError` before anything runs when the file is invalid.
    """
    cfg, text = load_campaign(config_path, profile, victim_url=victim_url)
    hooks = hooks or CampaignHooks()
    out = Path(out_dir) if out_dir else cfg.out_dir
    _claim_folder(out, cfg.campaign.name)
    t_start = time.perf_counter()
    command = " ".join(shlex.quote(a) for a in sys.argv)
    ledger = Ledger.open(out, command, cfg.campaign.name)
    timer = _Timer()
    timer.on_change = lambda: ledger.record({**timer.totals, "total": time.perf_counter() - t_start})
    seed = cfg.campaign.seed

    # --- victims: zoo builds ------------------------------------------------------------------------
    from translators.zoo import build

    models: dict[str, str] = {}
    with timer.phase("zoo"):
        for v in cfg.victims if not cfg.victim_service.url else []:  # a remote victim brings its own models
            if v.source and not v.source.startswith("zoo:"):
                models[v.name] = v.source
                continue
            recipe_name = v.recipe or v.name
            hooks.say(f"zoo: {recipe_name} ({cfg.campaign.zoo_profile})")
            models[v.name] = str(build(recipe_name, cfg.campaign.zoo_profile, seed=seed, device=cfg.campaign.device))

        served = dict(models)
        plans = []
        for params in cfg.entries():
            kind = CELL_KINDS[params.kind]
            if not cfg.victim_service.url:
                served.update(kind.models(cfg, params, out, models))
            plans.append((kind, params, kind.plan(cfg, params)))
    _check_saved_cells(cfg, out, plans)
    cell_labels = {p.id: p.defense for _, _, cells in plans for p in cells}
    service = _Service(cfg, out, cfg.victim_service.url, served, cell_labels)
    hooks.cells(len(cell_labels))
    try:
        with timer.phase("service"):
            hooks.say("starting the victim service" if not cfg.victim_service.url else
                      f"victim: {cfg.victim_service.url}")
            url = service.start()
        results = _run_cells(cfg, out, service, url, plans, served, timer, hooks, executor or SequentialExecutor())
    finally:
        service.stop()
    results.config_text = text
    results.config_path = str(config_path)
    results.command = command
    timer.totals["total"] = time.perf_counter() - t_start
    ledger.record(timer.totals)
    results.created_at = ledger.created_at  # the campaign's first start, whatever runs resumed it
    results.wall_times = campaign_times(ledger, results.cells)
    results.peak_memory_mb = _peak_memory_mb()
    results.finished_at = Results(kind="campaign", name="x").created_at
    if results.extraction_cells:
        results.derived = derive(results, target=cfg.evaluation.target_psnr, on_warning=hooks.say)
    path = write_results(results, out / "results.json")
    timer.on_change = lambda: None
    with timer.phase("report"):
        render_report(path)
    ledger.record(timer.totals, finished=True)
    results.wall_times = campaign_times(ledger, results.cells)
    write_results(results, path)
    return path


def _claim_folder(out: Path, name: str) -> None:
    """Create ``out`` for campaign ``name``. Raises :class:`CampaignConfigError` when it cannot be a folder
    or when another campaign ran there (resuming would clear that campaign's cells as changed settings)."""
    if (why := unusable_folder_reason(out)) is not None:
        raise CampaignConfigError(f"--out {out}: {why}")
    owner = folder_campaign(out)
    if owner is not None and owner != name:
        raise CampaignConfigError(
            f"--out {out} holds campaign {owner!r}, not {name!r}: running {name!r} there would replace its "
            "cells; name another --out folder (or delete that one)")


def _check_saved_cells(cfg: CampaignConfig, out: Path, plans: list[tuple[Any, Any, list[CellPlan]]]) -> None:
    """Stamp every planned cell with its settings before anything runs. A saved cell (finished, failed or
    partly run) whose settings changed since it was saved, or that an older Heist saved without a stamp and
    ``results.json`` cannot vouch for, is cleared with a warning, so it runs again from the start."""
    prev = previous_run(out)
    for kind, params, cells in plans:
        for plan in cells:
            paths = CellPaths(out / "cells" / plan.id)
            settings = kind.settings(cfg, params, plan)
            saved = paths.record.exists() or paths.run.exists()
            if saved or paths.stamp.exists():
                verdict = judge(paths.stamp, settings, functools.partial(prev.cell_settings, kind, plan.id,
                                                                         paths.dir / "attempts"))
                if verdict.state == "same":
                    continue
                if verdict.state == "adopted":
                    log.info("cell %s: saved without a settings fingerprint; results.json shows the same settings, "
                             "so it is kept", plan.id)
                else:
                    if saved:
                        log.warning("cell %s runs again: %s", plan.id, verdict.why())
                    shutil.rmtree(paths.dir)
            write_stamp(paths.stamp, settings)


def _run_cells(
    cfg: CampaignConfig, out: Path, service: _Service, url: str, plans: list[tuple[Any, Any, list[CellPlan]]],
    served: dict[str, str], timer: _Timer, hooks: CampaignHooks, executor: CellExecutor,
) -> Results:
    """Run every entry's cells through its kind: prepare, the pending cells' tasks through ``executor``
    (finished cells are kept), finish. Cells are recorded in plan order whatever order they finish in."""
    network, net_note = _feature_network(cfg)
    results = Results(kind="campaign", name=cfg.campaign.name, config=cfg.model_dump(mode="json"),
                      environment=Environment.capture(str(pick_device(cfg.campaign.device))),
                      seeds={"campaign": cfg.campaign.seed}, metric_settings=MetricSettings(),
                      feature_network=network.info if network else None, feature_network_note=net_note)
    live = {"url": url}

    def current_url() -> str:
        live["url"] = service.ensure(live["url"])
        return live["url"]

    def before(task: CellTask) -> CellTask:  # a self-started victim that died is restarted before the cell
        hooks.say(task.note or task.id)
        return dataclasses.replace(task, spec=dataclasses.replace(task.spec, url=current_url()))

    def cell_finished(cell: AnyCell) -> None:  # its phase times stay in its record (ledger.campaign_times)
        timer.on_change()
        hooks.say(f"{cell.id}: {cell.status}")
        hooks.cell_done(cell)

    ctx = RunContext(cfg=cfg, out=out, results=results, url=current_url, attack_key=service.attack_key,
                     honest_key=service.honest_key, served=served, say=hooks.say, phase=timer.phase,
                     shared={"feature_network": network},
                     admin_key=None if service.given_url else service.keys.admin)
    for kind, params, cells in plans:
        kind.prepare(ctx, params)
        finished: dict[str, AnyCell] = {}
        tasks = []
        for plan in cells:
            paths = CellPaths(out / "cells" / plan.id)
            prev = _load_cell(paths.record)
            if prev is not None and prev.status == "done":
                finished[plan.id] = prev
                hooks.cell_done(prev)
            else:
                tasks.append(kind.task(ctx, params, plan, paths))
        for cell in executor.run(run_cell, tasks, on_done=cell_finished, failed=failed_cell, before=before,
                                 local_victim=_is_loopback(live["url"])):
            finished[cell.id] = cell
        results.cells += [finished[p.id] for p in cells]
        kind.finish(ctx, params)
    return results


def _is_loopback(url: str) -> bool:
    """Whether the victim listens on this machine only (then a Ray executor keeps its cells on this node)."""
    host = httpx.URL(url).host
    return host in ("localhost", "::1") or host.startswith("127.")


def _feature_network(cfg: CampaignConfig) -> tuple[Any, str | None]:
    if cfg.evaluation.feature_weights is None:
        return None, ("FID/KID not computed: no feature network configured ([evaluation] feature_weights = "
                      "a local InceptionV3 weights file; see docs/evaluation.md). Membership cells pick their "
                      "own NKID network, named beside each NKID (docs/privacy.md)")
    return feature_network(str(cfg.evaluation.feature_weights)), None


