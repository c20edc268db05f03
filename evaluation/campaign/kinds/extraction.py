"""Cell kind ``extraction``: harvest queries through the API, train a surrogate, score it.

Every cell is victim x defense x strategy x budget x attacker. The attacker is ``plain`` (trains on the
outputs as harvested) or ``adaptive``: it trains one surrogate per counter-measure of ``counters``
(:mod:`attacker.countermeasures`: pre-filtering the harvested outputs, defense-aware subtraction) on the
same pairs and the cell keeps the one closest to the clean victim. That choice is an oracle (the evaluator
picks with the clean victim, which a thief cannot see), so ``adaptive`` is an upper bound on what these
counter-measures achieve: "a defense is only as good as it is against the best adaptive attacker".

:func:`run_extraction_cell` is the whole cell as a
plain function of an :class:`ExtractionSpec` and :class:`CellPaths` (what an executor ships):
:func:`harvest_and_train` (the heavy, resumable part), then scores against the clean victim's outputs
(fetched once in :meth:`ExtractionKind.prepare`) and ground truth on the headline image set, which the
spec rebuilds deterministically (:class:`EvalSetSpec`) wherever the cell runs.
"""

from __future__ import annotations

import functools
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, ValidationInfo, field_validator

from evaluation.campaign.kinds.base import (
    CellKind,
    CellPaths,
    CellPlan,
    CellTask,
    RunContext,
    StrictParams,
    cached_utility,
    campaign_settings,
    check_counters,
    check_images,
    check_strategies,
    check_strategy_params,
    defense_settings,
    feature_network,
    no_repeats,
    scoring_settings,
    victim_entry_settings,
)

if TYPE_CHECKING:
    from evaluation.campaign.config import CampaignConfig
    from evaluation.extraction import PairSet
    from evaluation.results import CampaignCell, DefenseUtility, SurrogateTraining


DEFAULT_COUNTERS = ("lowpass:sigma=1.0", "median", "jpeg:quality=75", "aware")


class AttackSection(StrictParams):
    """The ``extraction`` cell kind: query budgets (ascending; one harvest per victim/defense/strategy
    serves all of them) and strategies."""

    kind: Literal["extraction"] = "extraction"
    budgets: list[int] = Field(min_length=1)
    strategies: list[str] = Field(default_factory=lambda: ["crops"], min_length=1)
    strategy_params: dict[str, Any] = Field(default_factory=dict)
    images: str = "corpus:attacker"
    concurrency: int = Field(4, ge=1, le=64)
    attackers: list[Literal["plain", "adaptive"]] = Field(default_factory=lambda: ["plain"], min_length=1)
    counters: list[str] = Field(default_factory=lambda: list(DEFAULT_COUNTERS), min_length=1,
                                description="the adaptive attacker's counter-measures (attacker.countermeasures)")

    @field_validator("attackers")
    @classmethod
    def _attackers(cls, v: list[str]) -> list[str]:
        return no_repeats(v, "attackers")

    @field_validator("counters")
    @classmethod
    def _counters(cls, v: list[str]) -> list[str]:
        return check_counters(v, allow_none=False)

    @field_validator("budgets")
    @classmethod
    def _budgets(cls, v: list[int]) -> list[int]:
        if any(b < 1 for b in v):
            raise ValueError("budgets must be positive query counts")
        if v != sorted(set(v)):
            raise ValueError("budgets must be strictly increasing")
        return v

    @field_validator("strategies")
    @classmethod
    def _strategies(cls, v: list[str]) -> list[str]:
        return no_repeats(check_strategies(v), "strategies")

    @field_validator("strategy_params")
    @classmethod
    def _strategy_params(cls, v: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        return check_strategy_params(info.data.get("strategies") or [], v)

    @field_validator("images")
    @classmethod
    def _images(cls, v: str) -> str:
        check_images(v)
        return v


def cell_id(victim: str, defense: str, strategy: str, budget: int, attacker: str = "plain") -> str:
    """``victim.defense.strategy.bBUDGET`` (plain attacker: the id campaigns had before the attacker axis,
    so their cells resume), ``...bBUDGET.adaptive`` for the adaptive attacker."""
    suffix = "" if attacker == "plain" else f".{attacker}"
    return re.sub(r"[^A-Za-z0-9._-]", "_", f"{victim}.{defense}.{strategy}.b{budget}{suffix}")


@dataclass(frozen=True)
class EvalSetSpec:
    """One evaluation image set as plain data: :meth:`build` gives the same pairs in any process
    (:func:`evaluation.extraction.recipe_pairs` with the recipe's ``make_pair``, seeded)."""

    label: str
    images: str
    recipe: str
    scale: int
    input_multiple: int
    seed: int
    max_side: int | None

    def build(self) -> PairSet:
        from evaluation.extraction import recipe_pairs
        from translators.zoo import get_recipe

        return recipe_pairs(self.label, self.images, get_recipe(self.recipe).make_pair, scale=self.scale,
                            input_multiple=self.input_multiple, seed=self.seed, max_side=self.max_side)


@dataclass(frozen=True)
class ExtractionSpec:
    """Everything one extraction cell needs, as plain data (picklable for a remote executor).

    ``honest_key``: the unlimited clean tier's key (scoring); ``victim_outputs``: image name -> the clean
    victim's output on ``evaluation`` (``(1, 3, H, W)`` float in [0, 1]); ``feature_weights``: a local
    InceptionV3 weights file for FID/KID (None: none).
    """

    id: str
    defense: str
    url: str
    api_key: str
    victim: str
    images: str
    strategy: str
    strategy_params: dict[str, Any]
    budget: int
    concurrency: int
    seed: int
    surrogate: str
    surrogate_profile: str
    train_steps: int | None
    device: str
    honest_key: str
    evaluation: EvalSetSpec
    victim_outputs: dict[str, Any]
    feature_weights: str | None = None
    surrogate_kwargs: dict[str, Any] = field(default_factory=dict)  # architecture overrides (e.g. levels)
    train_time_s: float = 300.0  # training time budget (seconds, trials included)
    attacker: str = "plain"
    counters: tuple[str, ...] = ()  # adaptive: one surrogate per counter-measure spec
    counter: str = "none"  # the thief's counter-measure on harvested outputs (attacker/countermeasures.py)


@dataclass(frozen=True)
class ExtractionRun:
    """What :func:`harvest_and_train` produced: the surrogate checkpoint and the harvest's accounting."""

    checkpoint: Path
    pairs: int
    queries_used: int
    queries_refused: int
    wall_times: dict[str, float]
    input_pixels: int = 0  # input pixels the harvest sent (the single-example paper's x axis)
    surrogate_kind: str = ""  # what ``auto`` chose, or the configured kind
    training: SurrogateTraining | None = None  # steps and stop reason of the kept surrogate


def harvest_and_train(spec: ExtractionSpec, paths: CellPaths, counter: str | None = None,
                      out: Path | None = None) -> ExtractionRun:
    """Harvest ``spec.budget`` queries into ``paths.run`` and train a surrogate on them (both resume).

    ``counter``: the counter-measure applied to the harvested outputs before training (None: the spec's
    ``counter``); ``out``: the
    surrogate's folder (default ``RUN/surrogate``). A second call with another counter reuses the harvest.
    """
    from attacker.harvest import harvest
    from attacker.train import TrainConfig, train_surrogate
    from evaluation.campaign.runner import CampaignError
    from evaluation.results import SurrogateTraining

    t0 = time.perf_counter()
    h = harvest(spec.url, spec.api_key, spec.victim, paths.run, images=spec.images, strategy=spec.strategy,
                strategy_params=spec.strategy_params, budget=spec.budget, seed=spec.seed,
                client={"max_concurrency": spec.concurrency})
    times = {"harvest": round(time.perf_counter() - t0, 2)}
    answered = {str(k): int(v) for k, v in h.summary.get("responses", {}).items()}
    used = sum(n for status, n in answered.items() if status.isdigit() and status != "429")
    refused = int(h.summary.get("rate_limited_429", 0))
    if h.pairs == 0:
        raise CampaignError(f"harvest ended with no pairs ({h.stop_reason})")
    t0 = time.perf_counter()
    tr = train_surrogate(paths.run, out, config=TrainConfig(
        arch=spec.surrogate, profile=spec.surrogate_profile, steps=spec.train_steps, seed=spec.seed,
        device=spec.device, val_fraction=0.0 if h.pairs < 4 else 0.1, arch_kwargs=spec.surrogate_kwargs,
        time_budget=spec.train_time_s, counter=spec.counter if counter is None else counter))
    times["training"] = round(time.perf_counter() - t0, 2)
    return ExtractionRun(tr.checkpoint, h.pairs, used, refused, times,
                         input_pixels=int(h.summary.get("input_pixels") or 0), surrogate_kind=str(tr.summary["kind"]),
                         training=SurrogateTraining.from_summary(tr.summary))


def run_extraction_cell(spec: ExtractionSpec, paths: CellPaths) -> CampaignCell:
    """Harvest, train (both resume) and score one surrogate: fidelity against the clean victim's outputs,
    quality against ground truth (PSNR, SSIM, MS-SSIM; FID/KID with ``spec.feature_weights``).

    The adaptive attacker trains one surrogate per ``spec.counters`` entry on the same harvest
    (``RUN/surrogate-COUNTER``) and keeps the one with the highest mean PSNR to the clean victim; every
    counter-measure's PSNR is recorded in ``counter_fidelity``."""
    from evaluation.campaign.paper import receptive_field
    from evaluation.campaign.translate import padded_translator
    from evaluation.campaign.victim import HttpTranslator
    from evaluation.defense_scoring import surrogate_scores
    from evaluation.metrics import MetricSettings
    from evaluation.results import CampaignCell, ModelRef
    from translators.checkpoint import load_model

    cell = CampaignCell(id=spec.id, victim=spec.victim, defense=spec.defense, budget=spec.budget,
                        strategy=spec.strategy, seed=spec.seed, status="running", run_dir=str(paths.run),
                        attacker=spec.attacker)  # type: ignore[arg-type]
    counters = list(spec.counters) if spec.attacker == "adaptive" else [spec.counter]
    pairs = spec.evaluation.build()
    best: tuple[float, str, ExtractionRun, Any, Any] | None = None
    for counter in counters:
        out = None if spec.attacker == "plain" else paths.run / f"surrogate-{re.sub(r'[^A-Za-z0-9]+', '_', counter)}"
        r = harvest_and_train(spec, paths, counter=counter, out=out)
        for k, v in r.wall_times.items():  # summed over the counter-measures (a resumed harvest takes ~0 s)
            cell.wall_times[k] = round(cell.wall_times.get(k, 0.0) + v, 2)
        t0 = time.perf_counter()
        model = load_model(r.checkpoint)
        with HttpTranslator(spec.url, spec.victim, spec.honest_key) as clean:
            fidelity, quality = surrogate_scores(
                padded_translator(model.module), clean, pairs, settings=MetricSettings(),
                feature_network=feature_network(spec.feature_weights), seed=spec.seed,
                victim_outputs=spec.victim_outputs)
        cell.wall_times["evaluation"] = round(cell.wall_times.get("evaluation", 0.0) + time.perf_counter() - t0, 2)
        score = fidelity.mean("psnr")
        if spec.attacker == "adaptive" and score is not None:
            cell.counter_fidelity[counter] = round(float(score), 4)
        if best is None or (score is not None and score > best[0]):
            best = (score if score is not None else float("-inf"), counter, r, fidelity, quality)
    if best is None:
        raise RuntimeError("no counter-measure to train with")
    _, counter, r, cell.fidelity, cell.quality = best
    cell.counter = counter if spec.attacker == "adaptive" else None
    cell.queries_used, cell.queries_refused = r.queries_used, r.queries_refused
    cell.input_pixels, cell.surrogate_kind, cell.training = r.input_pixels, r.surrogate_kind, r.training
    model = load_model(r.checkpoint)
    cell.receptive_field = receptive_field(model.module, model.card.scale)
    cell.surrogate = ModelRef(name=f"surrogate-{spec.id}", path=str(r.checkpoint), task=model.card.task,
                              scale=model.card.scale, arch=model.card.arch)
    cell.status = "done"
    return cell


class ExtractionKind(CellKind):
    """The extraction campaign grid (``[attack]``); see the module docstring."""

    name = "extraction"
    Params = AttackSection

    def plan(self, cfg: CampaignConfig, params: AttackSection) -> list[CellPlan]:
        return [CellPlan(cell_id(v.name, d.label, s, b, a), d.label) for v in cfg.victims for d in cfg.defenses
                for s in params.strategies for b in params.budgets for a in params.attackers]

    @staticmethod
    def _coords(cfg: CampaignConfig, params: AttackSection, plan: CellPlan) -> tuple[str, str, int, str]:
        for v in cfg.victims:
            for s in params.strategies:
                for b in params.budgets:
                    for a in params.attackers:
                        if cell_id(v.name, plan.defense, s, b, a) == plan.id:
                            return v.name, s, b, a
        raise KeyError(plan.id)

    def settings(self, cfg: CampaignConfig, params: AttackSection, plan: CellPlan) -> dict[str, Any]:
        """The cell's victim (and surrogate settings), defense, strategy, budget and attacker; the entry's
        ``strategy_params``, ``images`` and ``concurrency`` (``counters`` for the adaptive attacker); scoring."""
        victim, strategy, budget, attacker = self._coords(cfg, params, plan)
        return {"kind": self.name, **campaign_settings(cfg), "victim": victim_entry_settings(cfg, victim),
                "defense": defense_settings(cfg, plan.defense), "strategy": strategy, "budget": budget,
                "attacker": attacker, "strategy_params": params.strategy_params, "images": params.images,
                "concurrency": params.concurrency,
                "counters": list(params.counters) if attacker == "adaptive" else [],
                "scoring": scoring_settings(cfg)}

    def pending(self, cfg: CampaignConfig, params: AttackSection, plan: CellPlan, paths: CellPaths) -> CampaignCell:
        from evaluation.results import CampaignCell

        victim, strategy, budget, attacker = self._coords(cfg, params, plan)
        return CampaignCell(id=plan.id, victim=victim, defense=plan.defense, budget=budget, strategy=strategy,
                            seed=cfg.campaign.seed, status="running", run_dir=str(paths.run),
                            attacker=attacker)  # type: ignore[arg-type]

    def prepare(self, ctx: RunContext, params: AttackSection) -> None:
        """Ground-truth pairs, the clean victim's outputs and every defense's honest-user cost."""
        from evaluation.campaign.victim import HttpTranslator, model_info
        from evaluation.defense_scoring import NO_DEFENSE
        from evaluation.results import DefenseEntry, ModelRef, VictimEntry
        from translators.zoo import get_recipe

        cfg, results = ctx.cfg, ctx.results
        results.budgets, results.strategies = list(params.budgets), list(params.strategies)
        for d in cfg.defenses:
            names = "+".join(str(s["name"]) for s in d.pipeline) or NO_DEFENSE
            if not any(e.label == d.label for e in results.defenses):
                results.defenses.append(DefenseEntry(label=d.label, name=names, params={"pipeline": d.pipeline}))
        sets: dict[str, list[EvalSetSpec]] = {}
        pairs: dict[str, Any] = {}
        clean_out: dict[str, dict[str, Any]] = {}
        url = ctx.url()
        for v in cfg.victims:
            info = model_info(url, v.name)
            recipe = get_recipe(v.recipe or v.name)
            sets[v.name] = [EvalSetSpec(label, images, recipe.name, info.scale, info.size_multiple, cfg.campaign.seed,
                                        cfg.evaluation.max_side)
                            for label, images in cfg.evaluation.image_sets.items()]
            pairs[v.name] = [s.build() for s in sets[v.name]]
            if not any(e.name == v.name for e in results.victims):
                results.victims.append(VictimEntry(
                    name=v.name, recipe=recipe.name,
                    model=ModelRef(name=v.name, path=ctx.served.get(v.name), url=url, task=info.task,
                                   scale=info.scale)))
        with ctx.phase("utility"):
            for v in cfg.victims:
                ps = pairs[v.name][0]
                with HttpTranslator(url, v.name, ctx.honest_key(NO_DEFENSE)) as clean:
                    clean_out[v.name] = {p.name: clean(p.input) for p in ps.pairs()}
                    memo = _Memo(clean, clean_out[v.name], ps)
                    for d in cfg.defenses:
                        results.utility.append(cached_utility(ctx, v.name, d.label, functools.partial(
                            _measure_utility, ctx, memo, v.name, d.label, ps)))
        ctx.shared["extraction"] = {"sets": sets, "pairs": pairs, "clean_out": clean_out}

    def task(self, ctx: RunContext, params: AttackSection, plan: CellPlan, paths: CellPaths) -> CellTask:
        from evaluation.defense_scoring import NO_DEFENSE

        cfg = ctx.cfg
        state = ctx.shared["extraction"]
        cell = self.pending(cfg, params, plan, paths)
        vcfg = next(v for v in cfg.victims if v.name == cell.victim)
        fw = cfg.evaluation.feature_weights
        spec = ExtractionSpec(
            id=plan.id, defense=plan.defense, url=ctx.url(), api_key=ctx.attack_key(plan.id, plan.defense),
            victim=cell.victim, images=params.images, strategy=cell.strategy, strategy_params=params.strategy_params,
            budget=cell.budget, concurrency=params.concurrency, seed=cfg.campaign.seed, surrogate=vcfg.surrogate,
            surrogate_profile=vcfg.surrogate_profile, train_steps=vcfg.train_steps, device=cfg.campaign.device,
            honest_key=ctx.honest_key(NO_DEFENSE), evaluation=state["sets"][cell.victim][0],
            victim_outputs=state["clean_out"][cell.victim], feature_weights=str(fw) if fw else None,
            surrogate_kwargs=dict(vcfg.surrogate_kwargs), train_time_s=vcfg.train_time_s or 300.0,
            attacker=cell.attacker, counters=tuple(params.counters) if cell.attacker == "adaptive" else ())
        what = (f"{len(spec.counters)} {vcfg.surrogate} surrogates (one per counter-measure)"
                if spec.counters else f"a {vcfg.surrogate} surrogate")
        return CellTask(run_extraction_cell, spec, paths, cell,
                        note=f"{plan.id}: harvesting {cell.budget} queries and training {what}")

    def finish(self, ctx: RunContext, params: AttackSection) -> None:
        """Sample grids, then the source paper's A/B/C tables and numbers beside ours (``[paper]``)."""
        from evaluation.campaign.paper import report_paper

        with ctx.phase("evaluation"):
            ctx.results.samples = _samples(ctx, params)
            if ctx.cfg.paper is not None:
                report_paper(ctx, ctx.shared["extraction"]["pairs"])


def _measure_utility(ctx: RunContext, clean: Any, victim: str, label: str, pairs: PairSet) -> DefenseUtility:
    """Honest-user cost of defense ``label`` on ``victim`` through its honest tier (``clean``: the clean victim)."""
    from evaluation.campaign.victim import HttpTranslator
    from evaluation.defense_scoring import utility_cost
    from evaluation.metrics import MetricSettings

    ctx.say(f"honest-user cost: {victim} / {label}")
    with HttpTranslator(ctx.url(), victim, ctx.honest_key(label)) as defended:
        return utility_cost(clean, defended, pairs, victim, label, settings=MetricSettings(),
                            feature_network=ctx.shared.get("feature_network"), seed=ctx.cfg.campaign.seed)


class _Memo:
    """The clean victim, answering the benchmark images from outputs already fetched."""

    def __init__(self, inner: Any, outputs: dict[str, Any], pairs: Any) -> None:
        import hashlib

        self.inner = inner
        self.cache = {hashlib.sha256(p.input.detach().cpu().contiguous().numpy().tobytes()).hexdigest(): outputs[p.name]
                      for p in pairs.pairs()}

    def __call__(self, x: Any) -> Any:
        import hashlib

        key = hashlib.sha256(x.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
        if key not in self.cache:
            self.cache[key] = self.inner(x)
        return self.cache[key]


def _samples(ctx: RunContext, params: AttackSection) -> list[Any]:
    """Image grids input | clean victim | defended victim | surrogate (largest budget) | ground truth."""
    from evaluation.campaign.translate import padded_translator
    from evaluation.campaign.victim import HttpTranslator
    from evaluation.results import GridRow, ImageGrid
    from translators.checkpoint import load_model
    from translators.codecs import write_image

    cfg, out = ctx.cfg, ctx.out
    if cfg.evaluation.samples == 0:
        return []
    state = ctx.shared["extraction"]
    surrogates = {c.id: Path(c.surrogate.path) for c in ctx.results.extraction_cells
                  if c.status == "done" and c.surrogate and c.surrogate.path}
    grids: list[ImageGrid] = []
    strategy, budget = params.strategies[0], params.budgets[-1]
    columns = ["input", "victim (clean)", "victim (defended)", f"surrogate ({budget} queries)", "ground truth"]
    for v in cfg.victims:
        chosen = list(state["pairs"][v.name][0].pairs())[: cfg.evaluation.samples]
        for d in cfg.defenses:
            cid = cell_id(v.name, d.label, strategy, budget)
            if cid not in surrogates:
                continue
            sur = padded_translator(load_model(surrogates[cid]).module)
            rows = []
            with HttpTranslator(ctx.url(), v.name, ctx.honest_key(d.label)) as defended:
                for p in chosen:
                    imgs = {"input": p.input, "victim (clean)": state["clean_out"][v.name][p.name],
                            "victim (defended)": defended(p.input), columns[3]: sur(p.input),
                            "ground truth": p.target}
                    paths = {}
                    for col, img in imgs.items():
                        rel = Path("samples") / v.name / d.label / f"{p.name}.{re.sub(r'[^a-z]+', '_', col)}.png"
                        (out / rel).parent.mkdir(parents=True, exist_ok=True)
                        write_image(img, out / rel)
                        paths[col] = str(rel)
                    rows.append(GridRow(name=p.name, images=paths))
            grids.append(ImageGrid(title=f"{v.name}, defense {d.label}: {strategy} attack, {budget} queries",
                                   columns=columns, rows=rows, victim=v.name, defense=d.label, budget=budget,
                                   strategy=strategy))
    return grids
