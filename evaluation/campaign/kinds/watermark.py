"""Cell kind ``watermark``: do the trace and ownership watermarks catch a thief, and at what cost?

One cell = victim x output-defense label x thief counter-measure. The thief harvests ``budget`` queries
through the defense's tier with its own API key and trains a surrogate (the extraction kind's
:func:`~evaluation.campaign.kinds.extraction.run_extraction_cell`, with ``counter`` applied to the harvested
outputs before training, :mod:`attacker.countermeasures`). The cell then records:

- attack fidelity: surrogate vs the clean victim (PSNR/SSIM on the headline image set);
- trace identification rate: every harvested output, read back from the attacker's pair store as
  stored, traced with :func:`defenses.watermark.trace.identify` against every key name of the service;
- ownership p-value: ``heist defend verify``'s test (:func:`evaluation.watermark.verify_ownership`) of
  the surrogate against the clean victim on ``queries`` probe images;
- calibration: the p-value of the surrogate of the undefended victim (defense ``none``, same victim
  and counter-measure), filled in by :meth:`WatermarkKind.finish`: the innocent case the test's null
  describes.

Honest-user cost (defended vs clean output, PSNR/SSIM) is measured once per victim and defense in
:meth:`WatermarkKind.prepare` (``results.utility``, shared with extraction entries).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, ValidationInfo, field_validator

from evaluation.campaign.kinds.base import (
    CellKind,
    CellPaths,
    CellPlan,
    CellTask,
    EntryError,
    RunContext,
    StrictParams,
    cached_utility,
    campaign_settings,
    check_counters,
    check_images,
    check_strategies,
    check_strategy_params,
    check_surrogate,
    defense_settings,
    no_repeats,
    save_record,
    scoring_settings,
    victim_entry_settings,
)

if TYPE_CHECKING:
    from evaluation.campaign.config import CampaignConfig, DefenseSection
    from evaluation.campaign.kinds.extraction import ExtractionSpec
    from evaluation.results import OwnershipScore, TraceScore, WatermarkCell

WATERMARKS = ("trace_watermark", "ownership_watermark")
PROVABLE_P = 1e-6  # the p-value below which `heist defend verify` says THEFT PROVABLE


class WatermarkParams(StrictParams):
    """A ``[[cells]]`` entry of kind ``watermark``.

    ``victims`` / ``defenses``: ``[[victims]]`` names and ``[[defenses]]`` labels (default: all; the
    defenses must include ``none``, the innocent case). ``budget``: queries each thief harvests.
    ``counters``: the thief's counter-measures on harvested outputs (``heist attack train --counter``
    specs: ``none``, ``jpeg:quality=75``, ``lowpass:sigma=1``, ``median``, ``aware``). ``surrogates``: the
    thief's surrogate kinds (``heist attack train --arch``; default: each victim's ``surrogate``). ``queries`` /
    ``probe_side`` / ``probe_images`` / ``probe_noise``: the ownership test's probes (``heist defend verify
    --queries``, ``--probe-side``, ``--images``, ``--probe-noise``; noise None = the CLI's default for the
    victim's task, 25/255 for a denoiser). ``max_false_match``: the trace's naming threshold (``heist defend
    trace --max-false-match``). ``secret_file``: the server's defense secret, required with
    ``[victim_service].url`` and refused without it (a self-started victim's secret is read from its data dir,
    and scoring with another secret would silently find no watermark).
    """

    kind: Literal["watermark"] = "watermark"
    victims: list[str] = Field(default_factory=list)
    defenses: list[str] = Field(default_factory=list)
    budget: int = Field(64, ge=1)
    strategy: str = "crops"
    strategy_params: dict[str, Any] = Field(default_factory=dict)
    images: str = "corpus:attacker"
    counters: list[str] = Field(default_factory=lambda: ["none"], min_length=1)
    surrogates: list[str] = Field(default_factory=list)
    queries: int = Field(32, ge=1, le=4096)
    probe_side: int = Field(128, ge=32, le=4096)
    probe_images: str = "corpus:benchmark"
    probe_noise: float | None = Field(None, ge=0.0, le=0.5)
    max_false_match: float = Field(1e-6, gt=0.0, le=1.0)
    secret_file: Path | None = None
    concurrency: int = Field(4, ge=1, le=64)

    @field_validator("strategy")
    @classmethod
    def _strategy(cls, v: str) -> str:
        return check_strategies([v])[0]

    @field_validator("strategy_params")
    @classmethod
    def _strategy_params(cls, v: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        return check_strategy_params([info.data["strategy"]] if "strategy" in info.data else [], v)

    @field_validator("images", "probe_images")
    @classmethod
    def _images(cls, v: str) -> str:
        check_images(v)
        return v

    @field_validator("counters")
    @classmethod
    def _counters(cls, v: list[str]) -> list[str]:
        return check_counters(v, allow_none=True, key=counter_label)

    @field_validator("surrogates")
    @classmethod
    def _surrogates(cls, v: list[str]) -> list[str]:
        from attacker.surrogates.base import get_surrogate
        from translators.errors import HeistError

        for name in v:
            try:
                get_surrogate(name)
            except HeistError as exc:
                raise ValueError(str(exc)) from None
        return v

    @field_validator("victims", "defenses", "surrogates")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        return no_repeats(v, "names")

    def victim_names(self, cfg: CampaignConfig) -> list[str]:
        return self.victims or [v.name for v in cfg.victims]

    def defense_labels(self, cfg: CampaignConfig) -> list[str]:
        return self.defenses or [d.label for d in cfg.defenses]

    def surrogate_kinds(self, cfg: CampaignConfig, victim: str) -> list[str]:
        """The surrogate kinds thieves of ``victim`` train (``surrogates``, else the victim's ``surrogate``)."""
        return self.surrogates or [next(v.surrogate for v in cfg.victims if v.name == victim)]

    def check(self, cfg: CampaignConfig) -> None:
        known_v = [v.name for v in cfg.victims]
        unknown = [v for v in self.victims if v not in known_v]
        if unknown:
            raise ValueError(f"watermark cell: unknown victims {unknown} (known: {known_v})")
        known_d = {d.label: d for d in cfg.defenses}
        unknown = [d for d in self.defenses if d not in known_d]
        if unknown:
            raise ValueError(f"watermark cell: unknown defense labels {unknown} (known: {sorted(known_d)})")
        labels = self.defense_labels(cfg)
        if "none" not in labels:
            raise ValueError('watermark cell: defenses must include "none" (the innocent surrogate that calibrates '
                             "the ownership p-value)")
        if not any(watermarks_of(known_d[d]) for d in labels):
            raise ValueError("watermark cell: no defense among "
                             f"{labels} applies {' or '.join(WATERMARKS)}; nothing to score")
        keys = {_key_of(p) for d in labels for p in ownership_params(known_d[d])}
        if len(keys) > 1:
            raise ValueError(f"watermark cell: the defenses use several ownership keys {sorted(keys)}; the "
                             "innocent calibration needs one (give every ownership_watermark the same key_id, "
                             "radius and source)")
        quota = cfg.limits.quota_total
        if quota is not None and self.budget > quota:
            raise ValueError(f"watermark cell: budget {self.budget} exceeds the tier's quota_total ({quota})")
        if cfg.victim_service.url and self.secret_file is None:
            raise ValueError("watermark cell: with [victim_service].url give secret_file (the server's "
                             "defense secret; tracing and verifying need it)")
        if not cfg.victim_service.url and self.secret_file is not None:
            raise EntryError("watermark cell: secret_file is only for a victim at [victim_service].url (or "
                             "--victim-url); the self-started victim's secret is read from its data dir, and "
                             "scoring with another one would find no watermark", key="secret_file")
        for name in self.victim_names(cfg) if self.surrogates else []:
            v = next(v for v in cfg.victims if v.name == name)
            for kind in self.surrogates:
                try:
                    check_surrogate(kind, v.surrogate_profile, dict(v.surrogate_kwargs), v.recipe or v.name)
                except ValueError as exc:
                    raise EntryError(f"watermark cell: victim {name!r}: {exc}", key="surrogates") from None


def _key_of(p: Any) -> tuple[str, int, str]:
    return (p.key_id, p.radius, p.source)


def watermarks_of(d: DefenseSection) -> set[str]:
    """The watermark defenses (``trace_watermark``, ``ownership_watermark``) in a defense's pipeline."""
    return {str(s["name"]) for s in d.pipeline if s.get("name") in WATERMARKS}


def ownership_params(d: DefenseSection) -> list[Any]:
    """The :class:`~defenses.watermark.ownership.OwnershipParams` of each ``ownership_watermark`` in ``d``."""
    from defenses.watermark.ownership import OwnershipParams

    return [OwnershipParams(**{k: v for k, v in s.items() if k != "name"})
            for s in d.pipeline if s.get("name") == "ownership_watermark"]


def counter_label(spec: str) -> str:
    """A counter-measure spec as a file-name-safe label: ``jpeg:quality=75`` -> ``jpeg-quality75``."""
    kind, _, rest = spec.strip().partition(":")
    extra = re.sub(r"[^A-Za-z0-9.]+", "", rest.replace(",", "-").replace("=", ""))
    return f"{kind}-{extra}" if extra else kind


def wm_cell_id(victim: str, defense: str, counter: str, surrogate: str | None = None) -> str:
    """``wm.VICTIM.DEFENSE.COUNTER`` (``.SURROGATE`` appended when the entry lists ``surrogates``)."""
    tail = f".{surrogate}" if surrogate else ""
    return re.sub(r"[^A-Za-z0-9._-]", "_", f"wm.{victim}.{defense}.{counter_label(counter)}{tail}")


@dataclass(frozen=True)
class WatermarkSpec:
    """One watermark cell as plain data (picklable for a remote executor).

    ``extraction``: the harvest + training + fidelity part (its ``url`` is replaced by ``url``);
    ``secret``: the server's defense secret; ``verify``: the ``OwnershipParams`` fields the test uses;
    ``victim_checkpoint``: the clean victim for the test (None: queried through ``honest_key``);
    ``clients``: every key name of the service (trace candidates); ``harvester``: the cell's key name.
    """

    url: str
    extraction: ExtractionSpec
    counter: str
    secret: int
    verify: dict[str, Any]
    victim_checkpoint: str | None
    multiple: int
    queries: int
    probe_side: int
    probe_images: str
    probe_noise: float
    clients: tuple[str, ...]
    harvester: str | None
    max_false_match: float
    ownership_marked: bool
    trace_marked: bool


def trace_harvest(run_dir: Path, secret: int, clients: tuple[str, ...], harvester: str | None,
                  max_false_match: float) -> TraceScore:
    """Trace every harvested output in ``run_dir/pairs`` (decoded from the stored file) to a key name."""
    from attacker.pairstore import PairStore
    from defenses.watermark.trace import MIN_SIDE, identify
    from evaluation.results import TraceScore

    store = PairStore(run_dir / "pairs").open(writable=False)
    n = hit = wrong = unnamed = small = 0
    dists: list[int] = []
    for rec in store.ok_records():
        _, y = store.load_pair(rec)
        n += 1
        if min(y.shape[-2:]) < MIN_SIDE:
            small += 1
            continue
        m = identify(y, secret, clients, max_false_match)
        if harvester is not None and m.nearest == harvester:
            dists.append(m.distance)
        if m.client is None:
            unnamed += 1
        elif m.client == harvester:
            hit += 1
        else:
            wrong += 1
    return TraceScore(harvester=harvester, images=n, identified=hit, misattributed=wrong, unnamed=unnamed,
                      too_small=small, rate=hit / n if n and harvester else None, candidates=len(clients),
                      max_false_match=max_false_match,
                      median_distance=float(statistics.median(dists)) if dists else None)


def verify_surrogate(spec: WatermarkSpec, checkpoint: Path) -> OwnershipScore:
    """``heist defend verify --suspect CHECKPOINT --model VICTIM`` as a record (same code path)."""
    from defenses.watermark.ownership import OwnershipParams
    from evaluation.campaign.victim import HttpTranslator
    from evaluation.results import OwnershipScore
    from evaluation.watermark import load_probes, module_translator, verify_ownership
    from translators.checkpoint import load_model

    params = OwnershipParams(**spec.verify)
    probes = load_probes(spec.probe_images, spec.queries, spec.probe_side, spec.multiple, spec.probe_noise)
    suspect = module_translator(load_model(checkpoint).module.eval())
    ext = spec.extraction
    if spec.victim_checkpoint:
        res = verify_ownership(suspect, module_translator(load_model(spec.victim_checkpoint).module.eval()),
                               probes, spec.secret, params)
    else:
        with HttpTranslator(spec.url, ext.victim, ext.honest_key) as clean:
            res = verify_ownership(suspect, clean, probes, spec.secret, params)
    return OwnershipScore(p_value=float(res["p_value"]), z=float(res["z"]),
                          max_z=float(res["max_z"]) if res.get("max_z") is not None else None,
                          cosine=float(res["cosine"]),
                          probes=int(res["probes"]), probe_side=int(res["probe_side"]),
                          probe_images=spec.probe_images, probe_noise=spec.probe_noise, key_id=params.key_id,
                          radius=params.radius,
                          source=params.source, null=str(res["null"]), seconds=round(float(res["seconds"]), 2))


def run_watermark_cell(spec: WatermarkSpec, paths: CellPaths) -> WatermarkCell:
    """Harvest, train (both resume), score fidelity, trace the harvest and verify the surrogate."""
    from evaluation.campaign.kinds.extraction import run_extraction_cell
    from evaluation.results import WatermarkCell

    ext = run_extraction_cell(dataclasses.replace(spec.extraction, url=spec.url), paths)
    cell = WatermarkCell(id=spec.extraction.id, victim=ext.victim, defense=ext.defense, counter=spec.counter,
                         budget=ext.budget, strategy=ext.strategy, seed=ext.seed, status="running",
                         run_dir=ext.run_dir, queries_used=ext.queries_used, queries_refused=ext.queries_refused,
                         wall_times=dict(ext.wall_times), surrogate=ext.surrogate, surrogate_kind=ext.surrogate_kind,
                         training=ext.training,
                         fidelity=ext.fidelity, quality=ext.quality, ownership_marked=spec.ownership_marked,
                         trace_marked=spec.trace_marked)
    t0 = time.perf_counter()
    cell.trace = trace_harvest(paths.run, spec.secret, spec.clients, spec.harvester, spec.max_false_match)
    cell.wall_times["trace"] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    assert ext.surrogate is not None
    assert ext.surrogate.path
    cell.ownership = verify_surrogate(spec, Path(ext.surrogate.path))
    cell.wall_times["verify"] = round(time.perf_counter() - t0, 2)
    cell.status = "done"
    return cell


def _service_secret_and_clients(ctx: RunContext, params: WatermarkParams) -> tuple[int, tuple[str, ...]]:
    """The defense secret (``secret_file``, else the self-started victim's data dir) and its key names."""
    from evaluation.campaign.runner import CampaignError
    from victim_service.services import read_defense_secret, secret_from_text
    from victim_service.settings import Settings

    if params.secret_file is not None:
        try:
            return secret_from_text(params.secret_file.read_bytes().strip(), f"secret_file {params.secret_file}"), ()
        except OSError as exc:
            raise CampaignError(f"cannot read secret_file {params.secret_file}: {exc.strerror or exc}") from None
    settings = Settings.from_file(ctx.out / "victim" / "settings.json")
    secret = read_defense_secret(settings)
    if secret is None:
        raise CampaignError(f"the victim service wrote no defense secret under {settings.state_dir()}")
    return secret, tuple(sorted(k.name for k in settings.keys))


class WatermarkKind(CellKind):
    """Watermark cells; see the module docstring."""

    name = "watermark"
    Params = WatermarkParams

    @staticmethod
    def _grid(cfg: CampaignConfig, params: WatermarkParams) -> list[tuple[str, str, str, str, str]]:
        """``(id, victim, defense, counter, surrogate kind)`` of every cell, in run order."""
        return [(wm_cell_id(v, d, c, s if params.surrogates else None), v, d, c, s)
                for v in params.victim_names(cfg) for s in params.surrogate_kinds(cfg, v)
                for d in params.defense_labels(cfg) for c in params.counters]

    def plan(self, cfg: CampaignConfig, params: WatermarkParams) -> list[CellPlan]:
        return [CellPlan(cid, d) for cid, _, d, _, _ in self._grid(cfg, params)]

    def _coords(self, cfg: CampaignConfig, params: WatermarkParams, plan: CellPlan) -> tuple[str, str, str]:
        for cid, v, _, c, s in self._grid(cfg, params):
            if cid == plan.id:
                return v, c, s
        raise KeyError(plan.id)

    def settings(self, cfg: CampaignConfig, params: WatermarkParams, plan: CellPlan) -> dict[str, Any]:
        """The cell's victim, defense, counter-measure and surrogate kind; the entry's harvest, probe and trace
        settings; the ownership key the test uses (from every defense of the entry); scoring."""
        victim, counter, surrogate = self._coords(cfg, params, plan)
        entry = params.model_dump(mode="json", exclude={"victims", "defenses", "counters", "surrogates"})
        known = {d.label: d for d in cfg.defenses}
        verify = [p.model_dump(mode="json") for d in params.defense_labels(cfg) for p in ownership_params(known[d])]
        return {"kind": self.name, **campaign_settings(cfg), "victim": victim_entry_settings(cfg, victim),
                "defense": defense_settings(cfg, plan.defense), "counter": counter, "surrogate": surrogate,
                "entry": entry, "verify": verify[:1], "scoring": scoring_settings(cfg)}

    def pending(self, cfg: CampaignConfig, params: WatermarkParams, plan: CellPlan, paths: CellPaths) -> WatermarkCell:
        from evaluation.results import WatermarkCell

        victim, counter, surrogate = self._coords(cfg, params, plan)
        d = next(d for d in cfg.defenses if d.label == plan.defense)
        marks = watermarks_of(d)
        return WatermarkCell(id=plan.id, victim=victim, defense=plan.defense, counter=counter, budget=params.budget,
                             surrogate_kind=None if surrogate == "auto" else surrogate,
                             strategy=params.strategy, seed=cfg.campaign.seed, status="running", run_dir=str(paths.run),
                             ownership_marked="ownership_watermark" in marks, trace_marked="trace_watermark" in marks)

    def prepare(self, ctx: RunContext, params: WatermarkParams) -> None:
        """Evaluation pairs, the clean victim's outputs, honest-user cost per defense, the secret."""
        from evaluation.campaign.kinds.extraction import EvalSetSpec, _measure_utility, _Memo
        from evaluation.campaign.victim import HttpTranslator, model_info
        from evaluation.defense_scoring import NO_DEFENSE
        from evaluation.results import DefenseEntry, ModelRef, VictimEntry
        from translators.zoo import get_recipe

        cfg, results = ctx.cfg, ctx.results
        labels = params.defense_labels(cfg)
        defenses = [d for d in cfg.defenses if d.label in labels]
        for d in defenses:
            if not any(e.label == d.label for e in results.defenses):
                names = "+".join(str(s["name"]) for s in d.pipeline) or NO_DEFENSE
                results.defenses.append(DefenseEntry(label=d.label, name=names, params={"pipeline": d.pipeline}))
        url = ctx.url()
        state: dict[str, Any] = {"sets": {}, "clean_out": {}, "multiple": {}, "task": {}}
        for name in params.victim_names(cfg):
            v = next(v for v in cfg.victims if v.name == name)
            info = model_info(url, name)
            recipe = get_recipe(v.recipe or v.name)
            label, images = next(iter(cfg.evaluation.image_sets.items()))
            spec = EvalSetSpec(label, images, recipe.name, info.scale, info.size_multiple, cfg.campaign.seed,
                               cfg.evaluation.max_side)
            state["sets"][name] = spec
            state["task"][name] = info.task
            state["multiple"][name] = math.lcm(int(info.size_multiple or 1), 16)  # U-Net surrogates need 2**depth
            if not any(e.name == name for e in results.victims):
                results.victims.append(VictimEntry(name=name, recipe=recipe.name, model=ModelRef(
                    name=name, path=ctx.served.get(name), url=url, task=info.task, scale=info.scale)))
            ps = spec.build()
            with ctx.phase("utility"), HttpTranslator(url, name, ctx.honest_key(NO_DEFENSE)) as clean:
                state["clean_out"][name] = {p.name: clean(p.input) for p in ps.pairs()}
                memo = _Memo(clean, state["clean_out"][name], ps)
                for d in defenses:
                    u = cached_utility(ctx, name, d.label, functools.partial(_measure_utility, ctx, memo, name,
                                                                              d.label, ps))
                    if not any(x.victim == name and x.defense == d.label for x in results.utility):
                        results.utility.append(u)
        state["secret"], state["clients"] = _service_secret_and_clients(ctx, params)
        own = [p for d in defenses for p in ownership_params(d)]
        state["verify"] = (own[0] if own else _default_ownership()).model_dump()
        ctx.shared[f"watermark:{id(params)}"] = state

    def task(self, ctx: RunContext, params: WatermarkParams, plan: CellPlan, paths: CellPaths) -> CellTask:
        from evaluation.campaign.kinds.extraction import ExtractionSpec
        from evaluation.defense_scoring import NO_DEFENSE
        from evaluation.watermark import probe_noise_for

        cfg = ctx.cfg
        state = ctx.shared[f"watermark:{id(params)}"]
        cell = self.pending(cfg, params, plan, paths)
        vcfg = next(v for v in cfg.victims if v.name == cell.victim)
        surrogate = self._coords(cfg, params, plan)[2]
        url = ctx.url()
        ext = ExtractionSpec(
            id=plan.id, defense=plan.defense, url=url, api_key=ctx.attack_key(plan.id, plan.defense),
            victim=cell.victim, images=params.images, strategy=params.strategy,
            strategy_params=params.strategy_params, budget=params.budget, concurrency=params.concurrency,
            seed=cfg.campaign.seed, surrogate=surrogate, surrogate_profile=vcfg.surrogate_profile,
            train_steps=vcfg.train_steps, device=cfg.campaign.device, honest_key=ctx.honest_key(NO_DEFENSE),
            evaluation=state["sets"][cell.victim], victim_outputs=state["clean_out"][cell.victim],
            surrogate_kwargs=dict(vcfg.surrogate_kwargs), train_time_s=vcfg.train_time_s or 300.0,
            counter=cell.counter)
        harvester = None if cfg.victim_service.url else f"atk-{plan.id}"[:64]  # victim_settings' key name
        spec = WatermarkSpec(
            url=url, extraction=ext, counter=cell.counter, secret=state["secret"], verify=state["verify"],
            victim_checkpoint=ctx.served.get(cell.victim), multiple=state["multiple"][cell.victim],
            queries=params.queries, probe_side=params.probe_side, probe_images=params.probe_images,
            probe_noise=probe_noise_for(state["task"][cell.victim]) if params.probe_noise is None
            else params.probe_noise, clients=state["clients"], harvester=harvester,
            max_false_match=params.max_false_match,
            ownership_marked=cell.ownership_marked, trace_marked=cell.trace_marked)
        return CellTask(run_watermark_cell, spec, paths, cell,
                        note=f"{plan.id}: harvesting {params.budget} queries through {plan.defense}, training a "
                             f"{surrogate} surrogate (counter-measure {cell.counter}), tracing and verifying")

    def finish(self, ctx: RunContext, params: WatermarkParams) -> None:
        """Give each cell the p-value of its innocent twin (defense ``none``, same victim, counter-measure and
        surrogate kind)."""
        from evaluation.results import WatermarkCell

        twin = {cid: wm_cell_id(v, "none", c, s if params.surrogates else None)
                for cid, v, _, c, s in self._grid(ctx.cfg, params)}
        cells = {c.id: c for c in ctx.results.cells if isinstance(c, WatermarkCell) and c.id in twin}
        for c in cells.values():
            t = cells.get(twin[c.id])
            p = t.ownership.p_value if t is not None and t.status == "done" and t.ownership else None
            if c.status == "done" and p != c.calibration_p_value:
                c.calibration_p_value = p
                save_record(c, ctx.out / "cells" / c.id / "cell.json")


def _default_ownership() -> Any:
    from defenses.watermark.ownership import OwnershipParams

    return OwnershipParams()
