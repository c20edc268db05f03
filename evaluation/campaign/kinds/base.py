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
from pydantic import BaseModel, ConfigDict

from translators.errors import HeistError
from translators.files import atomic_write_text

if TYPE_CHECKING:
    from evaluation.campaign.config import CampaignConfig
    from evaluation.features import FeatureNetwork
    from evaluation.results import AnyCell, Results

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


def no_repeats(values: list[Any], what: str) -> list[Any]:
    """For pydantic validators: ``values`` unchanged, or ``ValueError("<what> must not repeat")``."""
    if len(set(values)) != len(values):
        raise ValueError(f"{what} must not repeat")
    return values
