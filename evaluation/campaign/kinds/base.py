"""The cell-kind contract: what the campaign runner needs from every kind of experiment.

A campaign file lists entries (``[attack]`` for extraction, ``[[cells]]`` with a ``kind``); each entry
expands into cells. A :class:`CellKind` gives, for its entries:

- ``Params``: the pydantic schema of an entry (``extra="forbid"``: a key of another kind is an error);
- :meth:`CellKind.models`: extra checkpoints the victim service must serve (model-level defenses),
  built before the service starts;
- :meth:`CellKind.plan`: the cells (id + output-defense label, so the runner issues one API key each);
- :meth:`CellKind.prepare` / :meth:`CellKind.task` / :meth:`CellKind.finish`: shared setup, one pending
  cell as a picklable :class:`CellTask` (a module-level ``work(spec, paths)`` function and its plain-data
  spec; the runner's executor maps :func:`run_cell` over the tasks, in this process or as Ray tasks, see
  :mod:`evaluation.campaign.executors`; the cell's folder keeps partial work, so a cell resumes), and
  per-entry wrap-up;
- :meth:`CellKind.settings`: every setting that decides one cell's result; its fingerprint is saved with
  the cell, and a resume re-runs a saved cell whose settings changed (:mod:`evaluation.campaign.fingerprint`);
- ``report``: the report section rendering its cells from ``results.json``
  (:mod:`evaluation.report.kinds`).
"""

from __future__ import annotations

import functools
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import httpx
from pydantic import BaseModel, ConfigDict, ValidationError

from translators.errors import HeistError, first_problem
from translators.files import atomic_write_text

if TYPE_CHECKING:
    from evaluation.campaign.config import CampaignConfig
    from evaluation.features import FeatureNetwork
    from evaluation.results import AnyCell, DefenseUtility, Results

log = logging.getLogger(__name__)
CELL_ERRORS = (HeistError, httpx.HTTPError, OSError, RuntimeError, ValueError)  # a cell fails, the campaign goes on


@dataclass(frozen=True)
class CellPlan:
    """One planned cell: its id (folder name under ``cells/``) and the output-defense label it attacks."""

    id: str
    defense: str


@dataclass(frozen=True)
class CellPaths:
    """Where a cell keeps its state: ``dir/cell.json`` (the record) and ``dir/run`` (resumable work)."""

    dir: Path

    @property
    def record(self) -> Path:
        return self.dir / "cell.json"

    @property
    def run(self) -> Path:
        return self.dir / "run"

    @property
    def stamp(self) -> Path:
        """The settings the cell was (or is being) run with (:mod:`evaluation.campaign.fingerprint`)."""
        return self.dir / "fingerprint.json"


@dataclass
class RunContext:
    """What a kind may use while its cells run: the config, the live victim and the results being built.

    ``url()`` returns the URL of a live victim (restarting a self-started one that died);
    ``attack_key(cell_id, label)`` and ``honest_key(label)`` the API keys of the cell's client and of
    the unlimited honest client of a defense tier. ``served`` maps served model names to checkpoints.
    ``admin_key``: the admin key of a self-started service (kinds that create clients, e.g. ``monitor``).
    """

    cfg: CampaignConfig
    out: Path
    results: Results
    url: Callable[[], str]
    attack_key: Callable[[str, str], str]
    honest_key: Callable[[str], str]
    served: dict[str, str]
    say: Callable[[str], None]
    phase: Callable[[str], Any]
    shared: dict[str, Any] = field(default_factory=dict)  # per-kind state between prepare/run/finish
    admin_key: str | None = None  # the self-started service's admin key (None: a given URL)


class CellKind(ABC):
    """One kind of campaign experiment (see the module docstring)."""

    name: ClassVar[str]
    Params: ClassVar[type[BaseModel]]

    def models(self, cfg: CampaignConfig, params: Any, out: Path, victims: dict[str, str]) -> dict[str, str]:
        """Extra ``{served name: checkpoint}`` to serve; ``victims`` are the built victims. Default: none."""
        return {}

    @abstractmethod
    def plan(self, cfg: CampaignConfig, params: Any) -> list[CellPlan]:
        """The cells of one entry, in run order."""

    def prepare(self, ctx: RunContext, params: Any) -> None:  # noqa: B027 - optional step
        """Work shared by the entry's cells (before the first one runs)."""

    @abstractmethod
    def task(self, ctx: RunContext, params: Any, plan: CellPlan, paths: CellPaths) -> CellTask:
        """One pending cell as a picklable :class:`CellTask` (called after :meth:`prepare`)."""

    @abstractmethod
    def pending(self, cfg: CampaignConfig, params: Any, plan: CellPlan, paths: CellPaths) -> AnyCell:
        """The record written while the cell runs (status ``running``)."""

    def finish(self, ctx: RunContext, params: Any) -> None:  # noqa: B027 - optional step
        """Work after the entry's cells (e.g. sample grids)."""

    def settings(self, cfg: CampaignConfig, params: Any, plan: CellPlan) -> dict[str, Any]:
        """Every setting that decides the result of cell ``plan`` (plain JSON; its fingerprint is saved with the
        cell). Default, for a kind that names none: the whole entry, every victim and defense, ``[evaluation]``
        and the campaign-wide settings. Settings that change only speed (``[victim_service]``) stay out."""
        return {"kind": self.name, "cell": plan.id, "entry": params.model_dump(mode="json"), **campaign_settings(cfg),
                "victims": [victim_entry_settings(cfg, v.name) for v in cfg.victims],
                "defenses": [defense_settings(cfg, d.label) for d in cfg.defenses],
                "evaluation": cfg.evaluation.model_dump(mode="json")}


@dataclass(frozen=True)
class CellTask:
    """One pending cell as plain data an executor can ship to another process or node.

    ``work(spec, paths)`` (a module-level function, so it pickles by name) runs or resumes the cell and
    returns its finished record, raising on failure. ``spec`` is a frozen dataclass with a ``url`` field
    (the runner swaps in the URL of a restarted victim just before the cell runs). ``pending`` is the
    record written while the cell runs, and the base of its ``failed`` record. ``note`` is said when the
    cell starts.
    """

    work: Callable[[Any, CellPaths], AnyCell]
    spec: Any
    paths: CellPaths
    pending: AnyCell
    note: str = ""

    @property
    def id(self) -> str:
        return self.pending.id


def run_cell(task: CellTask) -> AnyCell:
    """What an executor maps over the tasks: count the attempt (``DIR/attempts``), write the ``running``
    record, run ``task.work``, and save the ``done`` or ``failed`` record in ``DIR/cell.json``."""
    paths = task.paths
    paths.dir.mkdir(parents=True, exist_ok=True)
    attempts = paths.dir / "attempts"
    attempts.write_text(str(int(attempts.read_text() or 0) + 1 if attempts.exists() else 1))
    save_record(task.pending, paths.record)
    try:
        cell = task.work(task.spec, paths)
    except CELL_ERRORS as exc:
        return failed_cell(task, cell_error(exc))
    save_record(cell, paths.record)
    return cell


def failed_cell(task: CellTask, error: str) -> AnyCell:
    """Save and return the task's ``failed`` record (also used when its worker died)."""
    log.error("cell %s failed: %s", task.id, error)
    cell = task.pending.model_copy(update={"status": "failed", "error": error[:500]})
    save_record(cell, task.paths.record)
    return cell


def save_record(obj: BaseModel, path: Path) -> None:
    """Write a pydantic record as JSON atomically (temp file + replace)."""
    atomic_write_text(path, obj.model_dump_json(indent=2), durable=False)


@functools.lru_cache(maxsize=2)
def feature_network(weights: str | None) -> FeatureNetwork | None:
    """The FID/KID feature network from a local weights file (None: none), loaded once per process."""
    if not weights:
        return None
    from evaluation.features import load_feature_network

    return load_feature_network(weights=weights)


@functools.lru_cache(maxsize=2)
def nkid_feature_network(name: str | None, weights: str | None) -> FeatureNetwork | None:
    """The NKID network of membership cells, loaded once per process: ``name`` (``"none"``: None), else
    InceptionV3 from ``weights`` or a found weights file, else the offline ``vgg16-random``
    (:func:`evaluation.features.resolve_feature_network`)."""
    from evaluation.features import resolve_feature_network

    return resolve_feature_network(name, weights)


def cell_error(exc: BaseException) -> str:
    """The one-line error a failed cell records."""
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:500]


def campaign_settings(cfg: CampaignConfig) -> dict[str, Any]:
    """Campaign-wide settings every cell depends on: seed, zoo profile, device, the attack tier's limits."""
    c = cfg.campaign
    return {"seed": c.seed, "zoo_profile": c.zoo_profile, "device": c.device,
            "limits": cfg.limits.model_dump(mode="json")}


def victim_model_settings(cfg: CampaignConfig, name: str) -> dict[str, Any]:
    """What decides the served model of victim ``name``: its source (default: the zoo recipe at the campaign's
    profile and seed; for a model file, also its content's SHA-256) and recipe."""
    v = next(v for v in cfg.victims if v.name == name)
    out = {"name": v.name, "source": v.source, "recipe": v.recipe or v.name, "zoo_profile": cfg.campaign.zoo_profile,
           "seed": cfg.campaign.seed}
    if v.source and not v.source.startswith("zoo:"):
        from translators.files import content_id

        out["source_content"] = content_id(Path(v.source))  # a model file replaced at the same path is new work
    return out


def victim_entry_settings(cfg: CampaignConfig, name: str) -> dict[str, Any]:
    """Victim ``name``'s model and the rest of its ``[[victims]]`` entry (the attacker's surrogate settings)."""
    v = next(v for v in cfg.victims if v.name == name)
    return {**victim_model_settings(cfg, name), **v.model_dump(mode="json", exclude={"name", "source", "recipe"})}


def defense_settings(cfg: CampaignConfig, label: str) -> dict[str, Any]:
    """The ``[[defenses]]`` entry ``label``: its pipeline, escalation levels and (a digest of) its API key."""
    from evaluation.campaign.fingerprint import secret_digest

    d = next(d for d in cfg.defenses if d.label == label)
    return {"label": d.label, "pipeline": d.pipeline, "levels": d.levels, "api_key": secret_digest(d.api_key)}


def scoring_settings(cfg: CampaignConfig) -> dict[str, Any]:
    """How surrogates and defenses are scored: the headline image set, ``max_side`` and the FID/KID weights."""
    label, images = next(iter(cfg.evaluation.image_sets.items()))
    fw = cfg.evaluation.feature_weights
    return {"image_set": [label, images], "max_side": cfg.evaluation.max_side,
            "feature_weights": str(fw) if fw else None}


def utility_settings(cfg: CampaignConfig, victim: str, label: str) -> dict[str, Any]:
    """What decides the honest-user cost of defense ``label`` on ``victim`` (``OUT/utility`` records)."""
    return {"what": "utility", "victim": victim_model_settings(cfg, victim), "defense": defense_settings(cfg, label),
            "scoring": scoring_settings(cfg), "seed": cfg.campaign.seed}


def cached_utility(ctx: RunContext, victim: str, label: str, measure: Callable[[], DefenseUtility]) -> DefenseUtility:
    """The honest-user cost of ``label`` on ``victim``: ``OUT/utility/VICTIM.LABEL.json`` when it was measured
    with the current settings (its fingerprint), else ``measure()``, saved there."""
    from evaluation.campaign.fingerprint import previous_run, reusable_artefact
    from evaluation.results import DefenseUtility

    path = ctx.out / "utility" / f"{victim}.{label}.json"
    prev = previous_run(ctx.out)
    recorded = functools.partial(utility_settings, victim=victim, label=label)
    if reusable_artefact(path, utility_settings(ctx.cfg, victim, label),
                         functools.partial(prev.recorded, recorded, path, listed=(victim, label) in prev.utility),
                         "the honest-user cost record"):
        return DefenseUtility.model_validate_json(path.read_text())
    u = measure()
    save_record(u, path)
    return u


class EntryError(ValueError):
    """A failed cross-check of one entry (:meth:`StrictParams.check`); ``key``: the entry's key it is about
    (reported at that key's line; None: at the entry's)."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


class StrictParams(BaseModel):
    """Base of every kind's parameter model: unknown keys are errors (reported at their line)."""

    model_config = ConfigDict(extra="forbid")

    def check(self, cfg: CampaignConfig) -> None:
        """Cross-checks against the whole campaign file; raise ``ValueError`` with a message."""


def check_counters(specs: list[str], *, allow_none: bool, key: Callable[[str], str] = str) -> list[str]:
    """Validate thief counter-measure specs (:func:`attacker.countermeasures.parse_counter`) for a
    pydantic validator: each parses, ``none`` only if ``allow_none``, no two equal under ``key``."""
    from attacker.countermeasures import parse_counter
    from attacker.errors import ConfigError

    for spec in specs:
        try:
            kind = parse_counter(spec).kind
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        if kind == "none" and not allow_none:
            raise ValueError("counters are counter-measures; 'none' is the plain attacker")
    no_repeats([key(s) for s in specs], "counters")
    return specs


def check_strategies(names: list[str], what: str = "") -> list[str]:
    """For pydantic validators: ``names`` unchanged when each is a registered attack strategy, else
    ``ValueError`` naming it and the known ones (``what`` prefixes the message, e.g. ``"monitor cell: "``)."""
    import attacker.strategies  # noqa: F401 - registers the built-in strategies
    from attacker.strategies.base import STRATEGY_REGISTRY

    for name in names:
        if name not in STRATEGY_REGISTRY:
            raise ValueError(f"{what}unknown strategy {name!r} (known: {', '.join(STRATEGY_REGISTRY.names())})")
    return names


def check_strategy_params(strategies: list[str], params: dict[str, Any]) -> dict[str, Any]:
    """For pydantic validators: ``params`` validated against each strategy's ``Params`` model
    (:mod:`attacker.strategies`), as the harvest will (unknown keys and bad values refused); unknown strategy
    names are left to their own check."""
    import attacker.strategies  # noqa: F401 - registers the built-in strategies
    from attacker.strategies.base import STRATEGY_REGISTRY

    for name in strategies:
        if name not in STRATEGY_REGISTRY:
            continue
        try:
            STRATEGY_REGISTRY.get(name).Params.model_validate(params)
        except ValidationError as exc:
            raise ValueError(f"strategy {name!r}: {first_problem(exc)}") from None
    return params


def check_images(spec: str | None) -> str | None:
    """For pydantic validators: ``spec`` names images that exist here (a corpus split, a fetched dataset, a
    folder with images), checked by :func:`translators.corpus.image_sizes` (headers only)."""
    from translators.corpus import image_sizes

    if spec is not None:
        try:
            image_sizes(spec)
        except (HeistError, OSError) as exc:
            raise ValueError(str(exc)) from None
    return spec


def check_surrogate(kind: str, profile: str, kwargs: dict[str, Any], recipe: str) -> None:
    """Raise ``ValueError`` unless the attacker can build surrogate ``kind`` (``auto``: one of its candidates,
    as training skips those that do not fit) at ``profile`` with architecture overrides ``kwargs`` for the task
    and scale of zoo ``recipe`` (:func:`attacker.train.surrogate_min_side`, what training checks first)."""
    from attacker.errors import ConfigError
    from attacker.surrogates import auto_candidates
    from attacker.train import TrainConfig, surrogate_min_side
    from translators.zoo import get_recipe

    r = get_recipe(recipe)
    names = auto_candidates(r.task, r.scale) if kind == "auto" else [kind]
    errors: list[str] = []
    for name in names:
        try:
            surrogate_min_side(TrainConfig(arch=name, profile=profile, arch_kwargs=kwargs), r.scale, r.task)
            return
        except (ConfigError, ValidationError) as exc:
            errors.append(str(exc).splitlines()[0])
    raise ValueError(errors[0] if len(errors) == 1 else f"{kind} ({', '.join(names)}): {'; '.join(errors)}")


def no_repeats(values: list[Any], what: str) -> list[Any]:
    """For pydantic validators: ``values`` unchanged, or ``ValueError("<what> must not repeat")``."""
    if len(set(values)) != len(values):
        raise ValueError(f"{what} must not repeat")
    return values
