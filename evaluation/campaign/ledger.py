"""A campaign's invocations: when it first started and what each run (first, resumes) spent outside its cells.

``OUT/invocations.json`` (rewritten after every run-level phase and cell, so a killed run keeps what it
measured)::

    {"created_at": "2026-01-02T10:00:00+00:00", "campaign": "demo",
     "invocations": [{"started_at": ..., "finished_at": ..., "command": ..., "wall_times": {"zoo": 12.6, ...}}]}

``wall_times`` of an invocation are its run-level phases (``zoo``, ``service``, ``utility``, ``reference``, the
entries' wrap-up ``evaluation``, ``report``) and its ``total``. Cells keep their own phase times in their
records (``cells/ID/cell.json``), so :func:`campaign_times` gives ``results.json: wall_times`` as the sum over
every invocation plus the sum over every cell, whichever run (or executor) ran it. A campaign folder written
before this file existed seeds it from its ``results.json`` (its ``created_at`` and run-level times).
``campaign`` names the campaign the folder belongs to (:func:`folder_campaign`), so that another campaign's
run does not take the folder over and clear its cells.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from translators.files import atomic_write_json

log = logging.getLogger(__name__)
LEDGER = "invocations.json"
RUN_PHASES = ("zoo", "service", "utility", "reference", "report", "total")  # taken from an older results.json


def now_iso() -> str:
    """UTC now, ISO 8601 to the second (as ``results.json`` writes its times)."""
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


@dataclass
class Ledger:
    """The invocations of one campaign folder; the last one is the current run."""

    path: Path
    created_at: str
    invocations: list[dict[str, Any]] = field(default_factory=list)
    campaign: str | None = None

    @classmethod
    def open(cls, out: Path, command: str, campaign: str) -> Ledger:
        """Load ``out/invocations.json`` (or seed it from an older ``results.json``) and start an invocation
        of ``campaign`` (the caller checked with :func:`folder_campaign` that the folder is this campaign's)."""
        path = out / LEDGER
        ledger = _load(path) or _seed(out, path)
        ledger.campaign = campaign
        ledger.invocations.append({"started_at": now_iso(), "finished_at": None, "command": command,
                                   "wall_times": {}})
        ledger.save()
        return ledger

    @property
    def resumed(self) -> bool:
        return len(self.invocations) > 1

    def record(self, wall_times: Mapping[str, float], *, finished: bool = False) -> None:
        """Save the current invocation's run-level ``wall_times`` (seconds) so far."""
        current = self.invocations[-1]
        current["wall_times"] = {k: round(float(v), 2) for k, v in wall_times.items()}
        if finished:
            current["finished_at"] = now_iso()
        self.save()

    def totals(self) -> dict[str, float]:
        """Run-level phase times summed over every invocation."""
        out: dict[str, float] = defaultdict(float)
        for inv in self.invocations:
            for phase, seconds in (inv.get("wall_times") or {}).items():
                out[phase] += float(seconds)
        return dict(out)

    def save(self) -> None:
        try:
            atomic_write_json(self.path, {"created_at": self.created_at, "campaign": self.campaign,
                                          "invocations": self.invocations}, durable=False)
        except OSError as exc:  # the times are a record, not a reason to stop the campaign
            log.warning("cannot write %s: %s", self.path, exc.strerror or exc)


def campaign_times(ledger: Ledger, cells: Iterable[Any]) -> dict[str, float]:
    """``results.json: wall_times``: every invocation's run-level times plus every cell's own phase times."""
    out: dict[str, float] = defaultdict(float, ledger.totals())
    for cell in cells:
        for phase, seconds in (getattr(cell, "wall_times", None) or {}).items():
            if phase != "total":
                out[phase] += float(seconds)
    return {k: round(v, 2) for k, v in out.items()}


def folder_campaign(out: Path) -> str | None:
    """The name of the campaign that ran in folder ``out``: its ledger's, else (a folder an older Heist wrote)
    its ``results.json``'s; None for a new folder or one whose records say nothing."""
    from evaluation.campaign.fingerprint import previous_run

    try:
        raw = json.loads((out / LEDGER).read_text(encoding="utf-8"))
    except (OSError, ValueError):  # none yet, or unreadable (Ledger.open says so and starts it again)
        raw = None
    if isinstance(raw, dict) and isinstance(raw.get("campaign"), str):
        return str(raw["campaign"])
    return previous_run(out).name


def _load(path: Path) -> Ledger | None:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        invocations = [i for i in raw["invocations"] if isinstance(i, dict)]
        return Ledger(path, str(raw["created_at"]), invocations, raw.get("campaign"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("%s is unreadable (%s); the campaign's times start again from this run", path, exc)
        return None


def _seed(out: Path, path: Path) -> Ledger:
    """A new ledger; a folder with an older ``results.json`` (no ledger) keeps its first start and times."""
    from evaluation.campaign.fingerprint import previous_run

    prev = previous_run(out)
    if prev.created_at is None:
        return Ledger(path, now_iso())
    before = {k: v for k, v in prev.wall_times.items() if k in RUN_PHASES}
    return Ledger(path, prev.created_at, [{"started_at": prev.created_at, "finished_at": None, "command": None,
                                           "wall_times": before}])
