"""Run a campaign: zoo -> victim service -> honest-user cost -> attacks (harvest, train, score) -> report.

Every attack cell is victim x defense x strategy x budget. A cell harvests ``budget`` queries through
the real HTTP API with its own API key (a fresh client with the tier's limits and quota), trains a
surrogate on them (:func:`attacker.train.train_surrogate`), and scores it against the *clean* victim
and against ground truth on the evaluation image sets. Cell state lives in ``OUT/cells/ID/cell.json``;
a rerun skips finished cells, retries failed ones, and the harvest and training inside a cell resume
where a kill left them. ``results.json`` is rebuilt from the cell files at the end of every run, and
the report is rendered from it.
"""

from __future__ import annotations

import contextlib
import logging
import re
import resource
import shlex
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import torch

from evaluation.campaign.config import CampaignConfig, load_campaign
from evaluation.campaign.paper import extraction_tables, paper_rows, receptive_field
from evaluation.campaign.translate import padded_translator
from evaluation.campaign.victim import HttpTranslator, VictimKeys, victim_settings
from evaluation.defense_scoring import NO_DEFENSE, derive, surrogate_scores, utility_cost
from evaluation.extraction import PairSet, recipe_pairs
from evaluation.metrics import MetricSettings
from evaluation.report import render_report
from evaluation.results import (
    CampaignCell,
    DefenseEntry,
    DefenseUtility,
    Environment,
    GridRow,
    ImageGrid,
    ModelRef,
    Results,
    VictimEntry,
    write_results,
)
from translators.codecs import write_image
from translators.device import pick_device
from translators.errors import HeistError

log = logging.getLogger(__name__)
PHASES = ("zoo", "service", "utility", "harvest", "training", "evaluation", "report")


class CampaignError(HeistError):
    code = "campaign_failed"


@dataclass
class CampaignHooks:
    """Optional callbacks for a progress display: ``cells(total)``, ``cell_done(cell)``, ``say(text)``."""

    cells: Callable[[int], None] = lambda total: None
    cell_done: Callable[[CampaignCell], None] = lambda cell: None
    say: Callable[[str], None] = lambda text: log.info(text)


@dataclass
class _Timer:
    totals: dict[str, float] = field(default_factory=lambda: defaultdict(float))

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.totals[name] += time.perf_counter() - t0


def cell_id(victim: str, defense: str, strategy: str, budget: int) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", f"{victim}.{defense}.{strategy}.b{budget}")


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


class _Memo:
    """Remembers a translator's outputs by input content, so the clean victim answers each image once."""

    def __init__(self, inner: HttpTranslator) -> None:
        self.inner = inner
        self.cache: dict[str, torch.Tensor] = {}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        import hashlib

        key = hashlib.sha256(x.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
        if key not in self.cache:
            self.cache[key] = self.inner(x)
        return self.cache[key]

    def close(self) -> None:
        self.inner.close()


def _model_info(url: str, name: str) -> dict[str, Any]:
    r = httpx.get(f"{url}/v1/models", timeout=30)
    r.raise_for_status()
    body = r.json()
    items = body.get("models", body) if isinstance(body, dict) else body
    for m in items:
        if m.get("name") == name:
            return dict(m)
    raise CampaignError(f"the victim service does not serve model {name!r}")


def _load_cell(path: Path) -> CampaignCell | None:
    if not path.exists():
        return None
    try:
        return CampaignCell.model_validate_json(path.read_text())
    except ValueError:
        return None


def _save_model(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(obj.model_dump_json(indent=2))
    tmp.replace(path)


def run_campaign(
    config_path: str | Path,
    *,
    victim_url: str | None = None,
    out_dir: str | Path | None = None,
    hooks: CampaignHooks | None = None,
    profile: str | None = None,
) -> Path:
    """Run (or resume) the campaign in ``config_path``; returns the path of ``results.json``.

    ``victim_url`` overrides ``[victim_service].url``; ``profile`` applies ``[profiles.NAME]``. Raises
    :class:`CampaignConfigError` before anything runs when the file is invalid.
    """
    cfg, text = load_campaign(config_path, profile)
    if victim_url:
        cfg = CampaignConfig.model_validate({**cfg.model_dump(), "victim_service": {
            **cfg.victim_service.model_dump(), "url": victim_url}})
    hooks = hooks or CampaignHooks()
    out = Path(out_dir) if out_dir else cfg.out_dir
    out.mkdir(parents=True, exist_ok=True)
    timer = _Timer()
    t_start = time.perf_counter()
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

    grid = [(v.name, d.label, s, b) for v in cfg.victims for d in cfg.defenses for s in cfg.attack.strategies
            for b in cfg.attack.budgets]
    cell_labels = {cell_id(*g): g[1] for g in grid}
    service = _Service(cfg, out, cfg.victim_service.url, models, cell_labels)
    hooks.cells(len(grid))
    try:
        with timer.phase("service"):
            hooks.say("starting the victim service" if not cfg.victim_service.url else
                      f"victim: {cfg.victim_service.url}")
            url = service.start()
        results = _run_grid(cfg, out, service, url, grid, timer, hooks)
    finally:
        service.stop()
    results.config_text = text
    results.config_path = str(config_path)
    results.command = " ".join(shlex.quote(a) for a in sys.argv)
    timer.totals["total"] = time.perf_counter() - t_start
    results.wall_times = {k: round(v, 2) for k, v in timer.totals.items()}
    results.peak_memory_mb = _peak_memory_mb()
    results.finished_at = Results(kind="campaign", name="x").created_at
    results.derived = derive(results, target=cfg.evaluation.target_psnr, on_warning=hooks.say)
    path = write_results(results, out / "results.json")
    with timer.phase("report"):
        render_report(path)
    results.wall_times["report"] = round(timer.totals["report"], 2)
    write_results(results, path)
    return path


def _pairs_for(cfg: CampaignConfig, recipe: Any, info: dict[str, Any]) -> list[PairSet]:
    multiple = int(info.get("size_multiple") or 1)
    return [
        recipe_pairs(label, spec, recipe.make_pair, scale=int(info.get("scale") or 1), input_multiple=multiple,
                     seed=cfg.campaign.seed, max_side=cfg.evaluation.max_side)
        for label, spec in cfg.evaluation.image_sets.items()
    ]


def _run_grid(
    cfg: CampaignConfig, out: Path, service: _Service, url: str, grid: list[tuple[str, str, str, int]],
    timer: _Timer, hooks: CampaignHooks,
) -> Results:
    from attacker.harvest import harvest
    from attacker.train import TrainConfig, train_surrogate
    from translators.checkpoint import load_model
    from translators.zoo import get_recipe

    seed = cfg.campaign.seed
    settings = MetricSettings()
    network, net_note = _feature_network(cfg)
    results = Results(kind="campaign", name=cfg.campaign.name, config=cfg.model_dump(mode="json"),
                      environment=Environment.capture(str(pick_device(cfg.campaign.device))), seeds={"campaign": seed},
                      metric_settings=settings, budgets=list(cfg.attack.budgets),
                      strategies=list(cfg.attack.strategies),
                      feature_network=network.info if network else None, feature_network_note=net_note)
    for d in cfg.defenses:
        names = "+".join(str(s["name"]) for s in d.pipeline) or NO_DEFENSE
        results.defenses.append(DefenseEntry(label=d.label, name=names, params={"pipeline": d.pipeline}))

    # Ground-truth pairs and clean victim outputs, per victim (first image set is the headline one).
    pairs: dict[str, list[PairSet]] = {}
    clean_out: dict[str, dict[str, torch.Tensor]] = {}
    for v in cfg.victims:
        info = _model_info(url, v.name)
        recipe = get_recipe(v.recipe or v.name)
        pairs[v.name] = _pairs_for(cfg, recipe, info)
        results.victims.append(VictimEntry(
            name=v.name, recipe=recipe.name,
            model=ModelRef(name=v.name, path=service.models.get(v.name), url=url, task=str(info.get("task")),
                           scale=int(info.get("scale") or 1))))

    # Honest-user cost of every defense (through the API, unlimited honest tiers).
    with timer.phase("utility"):
        for v in cfg.victims:
            clean = _Memo(HttpTranslator(url, v.name, service.honest_key(NO_DEFENSE)))
            ps = pairs[v.name][0]
            clean_out[v.name] = {p.name: clean(p.input) for p in ps.pairs()}
            for d in cfg.defenses:
                upath = out / "utility" / f"{v.name}.{d.label}.json"
                if upath.exists():
                    results.utility.append(DefenseUtility.model_validate_json(upath.read_text()))
                    continue
                hooks.say(f"honest-user cost: {v.name} / {d.label}")
                defended = HttpTranslator(url, v.name, service.honest_key(d.label))
                u = utility_cost(clean, defended, ps, v.name, d.label, settings=settings, feature_network=network,
                                 seed=seed)
                _save_model(u, upath)
                results.utility.append(u)
                defended.close()
            clean.close()

    # Attack cells.
    surrogates: dict[str, Path] = {}
    for victim, label, strategy, budget in grid:
        cid = cell_id(victim, label, strategy, budget)
        cdir = out / "cells" / cid
        cpath = cdir / "cell.json"
        prev = _load_cell(cpath)
        if prev is not None and prev.status == "done":
            results.cells.append(prev)
            if prev.surrogate and prev.surrogate.path:
                surrogates[cid] = Path(prev.surrogate.path)
            hooks.cell_done(prev)
            continue
        vcfg = next(v for v in cfg.victims if v.name == victim)
        cell = CampaignCell(id=cid, victim=victim, defense=label, budget=budget, strategy=strategy, seed=seed,
                            status="running", run_dir=str(cdir / "run"))
        _save_model(cell, cpath)
        try:
            url = service.ensure(url)
            hooks.say(f"{cid}: harvesting {budget} queries")
            t0 = time.perf_counter()
            with timer.phase("harvest"):
                h = harvest(url, service.attack_key(cid, label), victim, cdir / "run", images=cfg.attack.images,
                            strategy=strategy, strategy_params=cfg.attack.strategy_params, budget=budget,
                            seed=seed, client={"max_concurrency": cfg.attack.concurrency})
            cell.wall_times["harvest"] = round(time.perf_counter() - t0, 2)
            answered = {str(k): int(v) for k, v in h.summary.get("responses", {}).items()}
            cell.queries_used = sum(n for status, n in answered.items() if status.isdigit() and status != "429")
            cell.queries_refused = int(h.summary.get("rate_limited_429", 0))
            if h.pairs == 0:
                raise CampaignError(f"harvest ended with no pairs ({h.stop_reason})")
            hooks.say(f"{cid}: training a {vcfg.surrogate} surrogate on {h.pairs} pairs")
            t0 = time.perf_counter()
            with timer.phase("training"):
                tr = train_surrogate(cdir / "run", config=TrainConfig(
                    arch=vcfg.surrogate, profile=vcfg.surrogate_profile, steps=vcfg.train_steps, seed=seed,
                    device=cfg.campaign.device, val_fraction=0.0 if h.pairs < 4 else 0.1,
                    arch_kwargs=vcfg.surrogate_kwargs, time_budget=vcfg.train_time_s or 300.0))
            cell.input_pixels = int(h.summary.get("input_pixels") or 0)
            cell.surrogate_kind = str(tr.summary["kind"])
            cell.wall_times["training"] = round(time.perf_counter() - t0, 2)
            t0 = time.perf_counter()
            with timer.phase("evaluation"):
                model = load_model(tr.checkpoint)
                sur = padded_translator(model.module)
                clean = HttpTranslator(url, victim, service.honest_key(NO_DEFENSE))
                ps = pairs[victim][0]
                cell.fidelity, cell.quality = surrogate_scores(
                    sur, clean, ps, settings=settings, feature_network=network, seed=seed,
                    victim_outputs=clean_out[victim])
                clean.close()
            cell.wall_times["evaluation"] = round(time.perf_counter() - t0, 2)
            cell.receptive_field = receptive_field(model.module, model.card.scale)
            cell.surrogate = ModelRef(name=f"surrogate-{cid}", path=str(tr.checkpoint), task=model.card.task,
                                      scale=model.card.scale, arch=model.card.arch)
            surrogates[cid] = tr.checkpoint
            cell.status = "done"
        except (HeistError, httpx.HTTPError, OSError, RuntimeError, ValueError) as exc:
            cell.status = "failed"
            cell.error = f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
            log.error("cell %s failed: %s", cid, cell.error)
        _save_model(cell, cpath)
        results.cells.append(cell)
        hooks.cell_done(cell)

    with timer.phase("evaluation"):
        url = service.ensure(url)
        results.samples = _samples(cfg, out, service, url, pairs, clean_out, surrogates)
        if cfg.paper is not None:
            _paper(cfg, out, service, url, pairs, network, results)
    return results


def _paper(cfg: CampaignConfig, out: Path, service: _Service, url: str, pairs: dict[str, list[PairSet]],
           network: Any, results: Results) -> None:
    """The source paper's numbers beside ours, and its A/B/C tables (see :mod:`.paper`)."""
    from translators.checkpoint import load_model

    opened: list[HttpTranslator] = []

    def victim(name: str) -> HttpTranslator:
        opened.append(HttpTranslator(url, name, service.honest_key(NO_DEFENSE)))
        return opened[-1]

    def surrogate(path: str) -> Any:
        return padded_translator(load_model(path).module)

    try:
        tables, _ = extraction_tables(cfg, results, pairs, victim, surrogate, network, out)
    finally:
        for t in opened:
            t.close()
    results.extraction.extend(tables)
    results.paper_source = cfg.paper.source if cfg.paper else None
    results.paper = paper_rows(cfg, results)


def _feature_network(cfg: CampaignConfig) -> tuple[Any, str | None]:
    if cfg.evaluation.feature_weights is None:
        return None, ("FID/KID not computed: no feature network configured ([evaluation] feature_weights = "
                      "a local InceptionV3 weights file; see docs/evaluation.md)")
    from evaluation.features import load_feature_network

    net = load_feature_network(weights=cfg.evaluation.feature_weights)
    return net, None


def _samples(
    cfg: CampaignConfig, out: Path, service: _Service, url: str, pairs: dict[str, list[PairSet]],
    clean_out: dict[str, dict[str, torch.Tensor]], surrogates: dict[str, Path],
) -> list[ImageGrid]:
    """Image grids input | clean victim | defended victim | surrogate (largest budget) | ground truth."""
    from translators.checkpoint import load_model

    if cfg.evaluation.samples == 0:
        return []
    grids: list[ImageGrid] = []
    strategy, budget = cfg.attack.strategies[0], cfg.attack.budgets[-1]
    columns = ["input", "victim (clean)", "victim (defended)", f"surrogate ({budget} queries)", "ground truth"]
    for v in cfg.victims:
        chosen = list(pairs[v.name][0].pairs())[: cfg.evaluation.samples]
        for d in cfg.defenses:
            cid = cell_id(v.name, d.label, strategy, budget)
            if cid not in surrogates:
                continue
            sur = padded_translator(load_model(surrogates[cid]).module)
            defended = HttpTranslator(url, v.name, service.honest_key(d.label))
            rows = []
            for p in chosen:
                imgs = {"input": p.input, "victim (clean)": clean_out[v.name][p.name],
                        "victim (defended)": defended(p.input), columns[3]: sur(p.input), "ground truth": p.target}
                paths = {}
                for col, img in imgs.items():
                    rel = Path("samples") / v.name / d.label / f"{p.name}.{re.sub(r'[^a-z]+', '_', col)}.png"
                    (out / rel).parent.mkdir(parents=True, exist_ok=True)
                    write_image(img, out / rel)
                    paths[col] = str(rel)
                rows.append(GridRow(name=p.name, images=paths))
            defended.close()
            grids.append(ImageGrid(title=f"{v.name}, defense {d.label}: {strategy} attack, {budget} queries",
                                   columns=columns, rows=rows, victim=v.name, defense=d.label, budget=budget,
                                   strategy=strategy))
    return grids
