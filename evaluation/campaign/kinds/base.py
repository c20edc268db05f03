"""The cell-kind contract: what the campaign runner needs from every kind of experiment.

A campaign file lists entries (``[attack]`` for extraction, ``[[cells]]`` with a ``kind``); each entry
expands into cells. A :class:`CellKind` gives, for its entries:

- ``Params``: the pydantic schema of an entry (``extra="forbid"``: a key of another kind is an error);
- :meth:`CellKind.models`: extra checkpoints the victim service must serve (model-level defenses),
  built before the service starts;
- :meth:`CellKind.plan`: the cells (id + output-defense label, so the runner issues one API key each);
- :meth:`CellKind.prepare` / :meth:`CellKind.run` / :meth:`CellKind.finish`: shared setup, one cell
  (resumable: the cell's folder keeps partial work; the heavy part is a plain importable function of a
  spec and :class:`CellPaths`, so an executor can run it elsewhere), and per-entry wrap-up;
- ``report``: the report section rendering its cells from ``results.json``
  (:mod:`evaluation.report.kinds`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    from evaluation.campaign.config import CampaignConfig
    from evaluation.results import AnyCell, Results


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
    def run(self, ctx: RunContext, params: Any, plan: CellPlan, paths: CellPaths) -> AnyCell:
        """Run (or resume) one cell and return its finished record; raise on failure."""

    @abstractmethod
    def pending(self, cfg: CampaignConfig, params: Any, plan: CellPlan, paths: CellPaths) -> AnyCell:
        """The record written while the cell runs (status ``running``)."""

    def finish(self, ctx: RunContext, params: Any) -> None:  # noqa: B027 - optional step
        """Work after the entry's cells (e.g. sample grids)."""


def cell_error(exc: BaseException) -> str:
    """The one-line error a failed cell records."""
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:500]


class StrictParams(BaseModel):
    """Base of every kind's parameter model: unknown keys are errors (reported at their line)."""

    model_config = ConfigDict(extra="forbid")

    def check(self, cfg: CampaignConfig) -> None:
        """Cross-checks against the whole campaign file; raise ``ValueError`` with a message."""
