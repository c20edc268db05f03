"""Cell kind ``monitor``: the query monitor against benign customers and attackers, escalation on or off.

One cell = one victim x one tier (a ``[[defenses]]`` label; the tier *escalates* when that entry has
``levels``: the monitor's level then changes what a flagged client gets). :func:`run_monitor_cell` is the
whole cell as a plain function of a :class:`MonitorSpec` and :class:`CellPaths`. Every phase below runs on
its own freshly started victim service (the campaign's settings, a fresh data folder and Redis key
prefix): the monitor links keys across the whole service, so clients of another cell or phase that drew
on the same photo pool would otherwise be linked to this one's and flagged early (a benign population
replaying the first one's photos would look like Sybil keys).

1. detection: :func:`evaluation.monitor_eval.evaluate_live` (benign population + every attacker, plain
   and evasive, at once, clients created through the admin API on the cell's tier); the ROC of the final
   risk of benign clients vs attackers; an escalation timeline of one more attacker (risk and level after
   each of its queries). Saved in ``run/detection.json`` (a rerun skips it).
2. cost: for each budget a fresh attacker key (on a fresh service) harvests and trains a surrogate (the
   extraction kind's own :func:`~evaluation.campaign.kinds.extraction.run_extraction_cell`, resumable under
   ``run/bB``); its PSNR to the clean victim gives the queries to reach ``target_psnr``
   (:func:`evaluation.defense_scoring.queries_to_target`).

:meth:`MonitorKind.finish` divides each escalating cell's queries to target by the same victim's
non-escalating cell's: the escalation cost ratio (SEAT, Zhang et al. 2021, reports 3.8-16x for
classifiers).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import re
import secrets
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator

from evaluation.campaign.kinds.base import (
    CellKind,
    CellPaths,
    CellPlan,
    CellTask,
    EntryError,
    RunContext,
    StrictParams,
    campaign_settings,
    check_images,
    check_strategies,
    check_strategy_params,
    defense_settings,
    no_repeats,
    save_record,
    scoring_settings,
    victim_entry_settings,
)
from evaluation.campaign.kinds.extraction import EvalSetSpec, ExtractionSpec
from evaluation.monitor_eval import AttackerSpec, default_attackers
from translators.files import atomic_write_json

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from evaluation.campaign.config import CampaignConfig
    from evaluation.results import MonitorCell


class MonitorParams(StrictParams):
    """A ``[[cells]]`` entry of kind ``monitor``.

    ``victim``: a ``[[victims]]`` name. ``defenses``: tier labels (``[[defenses]]``), one cell each; an entry
    with ``levels`` escalates. Benign population: ``benign_clients`` customers of ``photos_per_client`` photos
    from ``benign_images`` (+ ``extra_benign``), think time scaled by ``time_scale``. ``attackers``: plain
    and evasive (:class:`~evaluation.monitor_eval.AttackerSpec`; default: every built-in strategy and
    evasion). ``timeline_queries``: queries of the timeline attacker (``timeline_strategy``). Cost:
    ``cost_budgets`` (ascending) of ``cost_strategy``; ``target_psnr`` (dB, default
    ``[evaluation].target_psnr``).
    """

    kind: Literal["monitor"] = "monitor"
    victim: str
    defenses: list[str] = Field(default_factory=lambda: ["none", "escalate"], min_length=1)
    benign_images: str = "corpus:victim"
    extra_benign: str | None = "corpus:benchmark"
    attacker_images: str = "corpus:attacker"
    benign_clients: int = Field(5, ge=1, le=1000)
    photos_per_client: int = Field(3, ge=1)
    time_scale: float = Field(0.05, gt=0.0, le=10.0)
    attackers: list[AttackerSpec] = Field(default_factory=lambda: default_attackers(40), min_length=1)
    timeline_queries: int = Field(40, ge=0, le=10_000)
    timeline_strategy: str = "crops"
    cost_strategy: str = "crops"
    cost_budgets: list[int] = Field(default_factory=lambda: [16, 64], min_length=1)
    target_psnr: float | None = Field(None, gt=0, allow_inf_nan=False)
    settle_s: float = Field(30.0, gt=0.0)
    concurrency: int = Field(4, ge=1, le=64)

    @field_validator("cost_budgets")
    @classmethod
    def _budgets(cls, v: list[int]) -> list[int]:
        if any(b < 1 for b in v) or v != sorted(set(v)):
            raise ValueError("cost_budgets must be positive and strictly increasing")
        return v

    @field_validator("defenses")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        return no_repeats(v, "defenses")

    @field_validator("benign_images", "extra_benign", "attacker_images")
    @classmethod
    def _images(cls, v: str | None) -> str | None:
        return check_images(v)

    @field_validator("attackers")
    @classmethod
    def _attackers(cls, v: list[AttackerSpec]) -> list[AttackerSpec]:
        no_repeats([a.name for a in v], "attacker names")
        for a in v:
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,31}", a.name):
                raise ValueError(f"attacker name {a.name!r}: letters, digits, '.', '_', '-' (32 at most)")
        return v

    def check(self, cfg: CampaignConfig) -> None:
        if cfg.victim_service.url:
            raise ValueError("monitor cells need the self-started victim (they create clients with its admin key); "
                             "drop [victim_service].url")
        if not any(v.name == self.victim for v in cfg.victims):
            raise ValueError(f"monitor cell: no [[victims]] entry named {self.victim!r}")
        labels = {d.label for d in cfg.defenses}
        unknown = [d for d in self.defenses if d not in labels]
        if unknown:
            raise ValueError(f"monitor cell: unknown defense labels {unknown} (known: {sorted(labels)})")
        check_strategies(sorted({a.strategy for a in self.attackers} | {self.timeline_strategy, self.cost_strategy}),
                         "monitor cell: ")
        for a in self.attackers:
            try:
                check_strategy_params([a.strategy], a.params)
            except ValueError as exc:
                raise EntryError(f"monitor cell: attacker {a.name!r}: {exc}", key="attackers") from None
        quota = cfg.limits.quota_total
        need = max([self.cost_budgets[-1], self.timeline_queries, *(a.queries for a in self.attackers)])
        if quota is not None and need > quota:
            raise ValueError(f"monitor cell: {need} queries on one key exceed the tier's quota_total ({quota})")


def monitor_cell_id(victim: str, defense: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", f"mon.{victim}.{defense}")


@dataclass(frozen=True)
class MonitorSpec:
    """One monitor cell as plain data (picklable for a remote executor). ``tier`` is the attack tier of
    ``defense``; ``tier_rate`` its rate (requests/s, None = unlimited); ``extraction`` the cost attackers'
    :class:`~evaluation.campaign.kinds.extraction.ExtractionSpec`, whose ``id``, ``url``, ``api_key`` and
    ``budget`` each budget's run replaces (built when the cell is planned, so a bad field fails there)."""

    id: str
    url: str
    admin_key: str
    victim: str
    defense: str
    escalation: bool
    tier: str
    tier_rate: float | None
    benign_images: str
    extra_benign: str | None
    attacker_images: str
    benign_clients: int
    photos_per_client: int
    time_scale: float
    attackers: tuple[dict[str, Any], ...]
    timeline_queries: int
    timeline_strategy: str
    cost_budgets: tuple[int, ...]
    target_psnr: float
    settle_s: float
    seed: int
    extraction: ExtractionSpec
    service: dict[str, Any] = field(default_factory=dict)  # the victim settings mapping each phase starts
    workers: int = 1
    startup_timeout_s: float = 600.0


@contextlib.contextmanager
def fresh_service(spec: MonitorSpec, paths: CellPaths, tag: str) -> Iterator[MonitorSpec]:
    """Start the victim service with fresh monitor state (new data folder, new Redis key prefix); yields
    ``spec`` with its ``url``. The data folder is removed afterwards, ``run/TAG.server.log`` kept."""
    from victim_service.process import start_service
    from victim_service.settings import Settings

    token = secrets.token_hex(4)
    data_dir = paths.run / f"svc-{tag}-{token}"
    data = {**spec.service, "data_dir": str(data_dir / "data")}
    if data.get("redis_url"):
        data["key_prefix"] = f"{data.get('key_prefix', 'heist-campaign:')}{tag}-{token}:"
    data_dir.mkdir(parents=True, exist_ok=True)
    settings_path = data_dir / "settings.json"
    Settings.from_mapping(data, str(settings_path)).to_json_file(settings_path)
    proc = start_service(settings_path, workers=spec.workers, log_path=paths.run / f"{tag}.server.log",
                         ready_timeout=spec.startup_timeout_s)
    try:
        yield dataclasses.replace(spec, url=str(proc.url))
    finally:
        proc.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


def _keys(spec: MonitorSpec, names: list[str]) -> dict[str, str]:
    """Keys of ``names`` on the cell's tier, created through the admin API of ``spec.url``."""
    from evaluation.monitor_eval import make_keys

    return asyncio.run(make_keys(spec.url, spec.admin_key, names, spec.tier))


def _detection(spec: MonitorSpec, paths: CellPaths, run_id: str) -> dict[str, Any]:
    """Benign population + attackers (evaluate_live), the ROC over clients and one escalation timeline."""
    from attacker.benign import BenignParams
    from evaluation.campaign.victim import model_info
    from evaluation.monitor_eval import attacker_bodies, escalation_timeline, evaluate_live, monitor_view
    from evaluation.privacy import roc_auc, roc_curve
    from translators.corpus import load_images

    ben = load_images(spec.benign_images) + (load_images(spec.extra_benign) if spec.extra_benign else [])
    att = load_images(spec.attacker_images)
    attackers = [AttackerSpec(**a) for a in spec.attackers]
    bp = BenignParams(clients=spec.benign_clients, photos_per_client=spec.photos_per_client)
    live = asyncio.run(evaluate_live(spec.url, spec.admin_key, spec.victim, ben, att, attackers, bp, spec.seed,
                                     tier=spec.tier, tier_rate=spec.tier_rate, time_scale=spec.time_scale,
                                     run_id=run_id, settle_s=spec.settle_s))
    view = asyncio.run(monitor_view(spec.url, spec.admin_key))
    benign_risk = [float(r["risk"]) for n, r in view.items() if n.startswith(f"{run_id}-benign-")]
    attack_risk = [float(a["max_risk"]) for a in live["attackers"]]
    out: dict[str, Any] = {"live": live, "benign_risk": benign_risk, "attacker_risk": attack_risk, "run_id": run_id}
    if benign_risk and attack_risk:
        scores, labels = benign_risk + attack_risk, [0] * len(benign_risk) + [1] * len(attack_risk)
        fpr, tpr, thr = roc_curve(scores, labels)
        out["roc"] = {"fpr": [round(float(x), 4) for x in fpr], "tpr": [round(float(x), 4) for x in tpr]}
        out["roc_thresholds"] = [float(min(x, 1.0)) for x in thr]
        out["roc_auc"] = round(roc_auc(scores, labels), 4)
    if spec.timeline_queries:
        name = f"{run_id}-timeline"
        key = _keys(spec, [name])[name]
        info = model_info(spec.url, spec.victim)
        bodies = attacker_bodies(AttackerSpec(name="timeline", strategy=spec.timeline_strategy,
                                              queries=spec.timeline_queries), att, info, spec.seed + 99)
        out["timeline"] = asyncio.run(escalation_timeline(spec.url, spec.admin_key, spec.victim, name, key, bodies))
        out["timeline_client"] = name
    return out


def _saved(path: Path, parse: Callable[[str], Any]) -> Any:
    """``parse`` of the text at ``path``; None when it is missing or unreadable (a kill tore it: the budget
    runs again, with a warning), so a torn file never fails the cell on every resume."""
    try:
        return parse(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("%s is unreadable (%s); its budget runs again", path, str(exc).splitlines()[0][:200])
        return None


def run_monitor_cell(spec: MonitorSpec, paths: CellPaths) -> MonitorCell:
    """Detection (once; ``run/detection.json``) then the cost curve (one resumable extraction per budget)."""
    from evaluation.campaign.kinds.extraction import run_extraction_cell
    from evaluation.defense_scoring import queries_to_target
    from evaluation.monitor_eval import monitor_view
    from evaluation.results import CampaignCell, MonitorCell, MonitorCostPoint, MonitorTimelinePoint, RocCurve

    t0 = time.perf_counter()
    paths.run.mkdir(parents=True, exist_ok=True)
    det_path = paths.run / "detection.json"
    det = _saved(det_path, json.loads)
    if not isinstance(det, dict):
        run_id = f"{re.sub(r'[^A-Za-z0-9]', '', spec.defense)[:10] or 'm'}{secrets.token_hex(3)}"
        with fresh_service(spec, paths, "detection") as live_spec:
            det = _detection(live_spec, paths, run_id)
        atomic_write_json(det_path, det, durable=False)
    t_det = time.perf_counter() - t0
    run_id = det["run_id"]
    live = det["live"]
    cell = MonitorCell(id=spec.id, victim=spec.victim, defense=spec.defense, escalation=spec.escalation,
                       seed=spec.seed, status="running", run_dir=str(paths.run), benign=live["benign"],
                       attackers=live["attackers"], caught_up=live["caught_up"], target_psnr=spec.target_psnr,
                       roc=RocCurve(**det["roc"]) if det.get("roc") else None, roc_auc=det.get("roc_auc"),
                       roc_thresholds=det.get("roc_thresholds", []),
                       timeline=[MonitorTimelinePoint(**p) for p in det.get("timeline", [])],
                       timeline_client=det.get("timeline_client"))
    used = sum(a["queries"] for a in live["attackers"]) + len(cell.timeline)
    t1 = time.perf_counter()
    for b in spec.cost_budgets:
        sub = CellPaths(paths.run / f"b{b}")
        seen = sub.dir / "monitor.json"  # the monitor's view of the cost key when its harvest ended
        prev = _saved(sub.record, CampaignCell.model_validate_json)
        row = _saved(seen, json.loads)
        if prev is None or prev.status != "done" or not isinstance(row, dict):
            name = f"{run_id}-cost-b{b}"
            with fresh_service(spec, paths, f"cost-b{b}") as live_spec:
                key = _keys(live_spec, [name])[name]
                ex = dataclasses.replace(spec.extraction, id=f"{spec.id}.b{b}", url=live_spec.url, api_key=key,
                                         budget=b)
                prev = run_extraction_cell(ex, sub)
                save_record(prev, sub.record)
                row = asyncio.run(monitor_view(live_spec.url, spec.admin_key)).get(name, {})
                atomic_write_json(seen, row, durable=False)
        psnr = prev.fidelity.mean("psnr") if prev.fidelity else None
        cell.cost.append(MonitorCostPoint(budget=b, queries_used=prev.queries_used, cell_id=prev.id,
                                          psnr=round(psnr, 3) if psnr is not None else None,
                                          flagged_at_query=row.get("flagged_at_query"), level=row.get("level"),
                                          training=prev.training))
        used += prev.queries_used or 0
    # x = answered queries (the budget): refusals of an overloaded service (503) are not the attacker's cost
    pts = [(p.budget, p.psnr) for p in cell.cost if p.psnr is not None]
    q = queries_to_target(pts, spec.target_psnr)
    cell.queries_to_target = round(q, 1) if q is not None else None
    cell.queries_used = used
    cell.wall_times = {"detection": round(t_det, 2), "cost": round(time.perf_counter() - t1, 2),
                       "total": round(time.perf_counter() - t0, 2)}
    cell.status = "done"
    return cell


def escalation_ratio(on: MonitorCell, off: MonitorCell) -> tuple[float | None, bool]:
    """Queries to target with escalation over those without; ``(ratio, lower_bound)``.

    None when the non-escalating attacker never reached the target (nothing to compare with). When the
    escalated attacker never reached it, the ratio is its largest budget over the other's queries to
    target, a lower bound (``True``).
    """
    if off.queries_to_target is None or off.queries_to_target <= 0:
        return None, False
    if on.queries_to_target is not None:
        return round(on.queries_to_target / off.queries_to_target, 2), False
    spent = max((p.budget for p in on.cost), default=0)
    return round(spent / off.queries_to_target, 2), True


class MonitorKind(CellKind):
    """Monitor cells; see the module docstring."""

    name = "monitor"
    Params = MonitorParams

    def plan(self, cfg: CampaignConfig, params: MonitorParams) -> list[CellPlan]:
        return [CellPlan(monitor_cell_id(params.victim, d), d) for d in params.defenses]

    def settings(self, cfg: CampaignConfig, params: MonitorParams, plan: CellPlan) -> dict[str, Any]:
        """The victim, the cell's tier (its defense and escalation levels), the entry's populations, attackers
        and cost settings, the target PSNR; campaign-wide settings and scoring."""
        entry = params.model_dump(mode="json", exclude={"defenses"})
        entry["target_psnr"] = params.target_psnr or cfg.evaluation.target_psnr
        return {"kind": self.name, **campaign_settings(cfg), "victim": victim_entry_settings(cfg, params.victim),
                "defense": defense_settings(cfg, plan.defense), "entry": entry, "scoring": scoring_settings(cfg)}

    def pending(self, cfg: CampaignConfig, params: MonitorParams, plan: CellPlan, paths: CellPaths) -> MonitorCell:
        from evaluation.results import MonitorCell

        d = next(d for d in cfg.defenses if d.label == plan.defense)
        return MonitorCell(id=plan.id, victim=params.victim, defense=plan.defense, escalation=bool(d.levels),
                           seed=cfg.campaign.seed, status="running", run_dir=str(paths.run),
                           target_psnr=params.target_psnr or cfg.evaluation.target_psnr)

    def prepare(self, ctx: RunContext, params: MonitorParams) -> None:
        """The headline evaluation set and the clean victim's outputs on it (what cost surrogates are scored on)."""
        from evaluation.campaign.victim import HttpTranslator, model_info
        from evaluation.defense_scoring import NO_DEFENSE
        from translators.zoo import get_recipe

        key = f"monitor:{params.victim}"
        if key in ctx.shared:
            return
        cfg = ctx.cfg
        v = next(v for v in cfg.victims if v.name == params.victim)
        info = model_info(ctx.url(), v.name)
        label, images = next(iter(cfg.evaluation.image_sets.items()))
        es = EvalSetSpec(label, images, get_recipe(v.recipe or v.name).name, info.scale, info.size_multiple,
                         cfg.campaign.seed, cfg.evaluation.max_side)
        with ctx.phase("utility"), HttpTranslator(ctx.url(), v.name, ctx.honest_key(NO_DEFENSE)) as clean:
            outs = {p.name: clean(p.input) for p in es.build().pairs()}
        ctx.shared[key] = {"set": es, "clean_out": outs}

    def task(self, ctx: RunContext, params: MonitorParams, plan: CellPlan, paths: CellPaths) -> CellTask:
        from evaluation.campaign.victim import VictimKeys, attack_tier, victim_settings
        from evaluation.defense_scoring import NO_DEFENSE

        if ctx.admin_key is None:
            raise ValueError("monitor cells need the self-started victim's admin key")
        keys = VictimKeys.load_or_create(ctx.out / "victim" / "keys.json")  # the same keys as the campaign's
        service = victim_settings(ctx.cfg, {params.victim: ctx.served[params.victim]}, keys, {}, paths.run)
        cfg = ctx.cfg
        state = ctx.shared[f"monitor:{params.victim}"]
        v = next(v for v in cfg.victims if v.name == params.victim)
        cell = self.pending(cfg, params, plan, paths)
        fw = cfg.evaluation.feature_weights
        extraction = ExtractionSpec(  # id, url, api_key and budget: set per budget when the cell runs
            id=plan.id, defense=plan.defense, url="", api_key="", budget=0, victim=v.name,
            images=params.attacker_images, strategy=params.cost_strategy, strategy_params={},
            concurrency=params.concurrency, seed=cfg.campaign.seed, surrogate=v.surrogate,
            surrogate_profile=v.surrogate_profile, train_steps=v.train_steps, device=cfg.campaign.device,
            honest_key=ctx.honest_key(NO_DEFENSE), evaluation=state["set"], victim_outputs=state["clean_out"],
            feature_weights=str(fw) if fw else None, surrogate_kwargs=dict(v.surrogate_kwargs),
            train_time_s=v.train_time_s or 300.0)
        spec = MonitorSpec(
            id=plan.id, url=ctx.url(), admin_key=ctx.admin_key, victim=v.name, defense=plan.defense,
            escalation=cell.escalation, tier=attack_tier(plan.defense), tier_rate=cfg.limits.rate,
            benign_images=params.benign_images, extra_benign=params.extra_benign,
            attacker_images=params.attacker_images, benign_clients=params.benign_clients,
            photos_per_client=params.photos_per_client, time_scale=params.time_scale,
            attackers=tuple(a.model_dump() for a in params.attackers), timeline_queries=params.timeline_queries,
            timeline_strategy=params.timeline_strategy, cost_budgets=tuple(params.cost_budgets),
            target_psnr=float(cell.target_psnr or cfg.evaluation.target_psnr), settle_s=params.settle_s,
            seed=cfg.campaign.seed, extraction=extraction, service=service, workers=cfg.victim_service.workers,
            startup_timeout_s=cfg.victim_service.startup_timeout_s)
        esc = "escalation on" if cell.escalation else "escalation off"
        return CellTask(run_monitor_cell, spec, paths, cell,
                        note=f"{plan.id}: monitor vs {len(params.attackers)} attackers and "
                             f"{params.benign_clients} customers ({esc}), then cost at {list(params.cost_budgets)}")

    def finish(self, ctx: RunContext, params: MonitorParams) -> None:
        """Escalation cost ratio of each escalating cell against the entry's first non-escalating one."""
        from evaluation.results import MonitorCell

        ids = {monitor_cell_id(params.victim, d) for d in params.defenses}
        cells = [c for c in ctx.results.cells if isinstance(c, MonitorCell) and c.id in ids and c.status == "done"]
        off = next((c for c in cells if not c.escalation), None)
        if off is None:
            return
        for c in cells:
            if c.escalation:
                c.escalation_ratio, c.ratio_lower_bound = escalation_ratio(c, off)
                save_record(c, ctx.out / "cells" / c.id / "cell.json")
