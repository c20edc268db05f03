"""Fingerprints: which settings produced a saved cell or a cached artefact, so a resume never reuses stale work.

Every saved cell (``OUT/cells/ID/fingerprint.json``) and every cached artefact a campaign reuses across runs
(model-level defense checkpoints under ``OUT/models``, the membership attacker's reference model, the
honest-user cost records under ``OUT/utility``; ``NAME.fingerprint.json`` beside each) carries a *stamp*:
the settings that decide its result (:meth:`~evaluation.campaign.kinds.base.CellKind.settings`, plain JSON)
and their fingerprint, the SHA-256 of their canonical JSON (sorted keys, no spaces). The stamp is written
before the work starts, so a kill leaves a stamp that names what was being built.

On a resume :func:`judge` compares the stamp with the settings the file asks for now:

- same fingerprint: the work is reused (a finished cell is skipped, a failed one resumes);
- different: the work is stale; the caller warns (naming the settings that changed) and redoes it;
- no stamp (saved by a Heist that wrote none): ``OUT/results.json`` (:class:`PreviousRun`) can tell which
  settings produced the work only when the run that wrote it also made it: the file lists it, and the work
  was written during that run (the cell's last attempt began, or the artefact was written, between that
  run's ``created_at`` and the file's own time; a cell an older run merely skipped could have been made
  with other settings). Then equal settings adopt the work (the stamp is written); anything else,
  including "cannot tell", is stale.
"""

from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from translators.files import atomic_write_json

if TYPE_CHECKING:
    from evaluation.campaign.config import CampaignConfig
    from evaluation.campaign.kinds.base import CellKind

log = logging.getLogger(__name__)
STAMP_VERSION = 1


def canonical_json(settings: Any) -> str:
    """``settings`` as canonical JSON: sorted keys, no whitespace, non-JSON values as their ``str``."""
    return json.dumps(settings, sort_keys=True, separators=(",", ":"), default=str)


def fingerprint(settings: Any) -> str:
    """SHA-256 (hex) of :func:`canonical_json` of ``settings``."""
    return hashlib.sha256(canonical_json(settings).encode("utf-8")).hexdigest()


def secret_digest(secret: str | None) -> str | None:
    """A short digest standing for a secret (an API key) in settings that are written to disk."""
    return None if secret is None else "sha256:" + hashlib.sha256(secret.encode("utf-8")).hexdigest()[:16]


def stamp_beside(artefact: Path) -> Path:
    """Where the stamp of a cached file lives: ``DIR/STEM.fingerprint.json``."""
    return artefact.with_name(f"{artefact.stem}.fingerprint.json")


@dataclass(frozen=True)
class Stamp:
    """A saved fingerprint and the settings it was computed from."""

    fingerprint: str
    settings: dict[str, Any]


def read_stamp(path: Path) -> Stamp | None:
    """The stamp saved at ``path`` (None when missing or unreadable)."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        return Stamp(str(raw["fingerprint"]), dict(raw.get("settings") or {}))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_stamp(path: Path, settings: dict[str, Any]) -> None:
    """Save ``settings`` and their fingerprint at ``path`` (atomically)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, {"version": STAMP_VERSION, "fingerprint": fingerprint(settings),
                             "settings": settings}, durable=False)


def changed_keys(old: Any, new: Any, prefix: str = "", depth: int = 3) -> list[str]:
    """Dotted paths (``defense.pipeline``) where ``old`` and ``new`` differ, ``depth`` levels deep at most."""
    if old == new:
        return []
    if depth == 0 or not (isinstance(old, dict) and isinstance(new, dict)):
        return [prefix or "(all)"]
    out: list[str] = []
    for key in sorted(set(old) | set(new)):
        out += changed_keys(old.get(key), new.get(key), f"{prefix}.{key}" if prefix else str(key), depth - 1)
    return out


@dataclass(frozen=True)
class Verdict:
    """What the stamp says about saved work.

    ``state``: ``same`` (reuse), ``adopted`` (no stamp, but ``results.json`` shows the same settings: reuse),
    ``changed`` (stale: ``keys`` name the settings that differ) or ``unknown`` (no stamp and nothing to tell
    which settings produced it: stale).
    """

    state: Literal["same", "adopted", "changed", "unknown"]
    keys: tuple[str, ...] = ()

    @property
    def reusable(self) -> bool:
        return self.state in ("same", "adopted")

    def why(self) -> str:
        """Why the work is redone, for a warning."""
        if self.state == "changed":
            return f"its settings changed since it was saved ({', '.join(self.keys[:6]) or 'unknown'})"
        return ("it was saved by an older Heist without a settings fingerprint and results.json does not show "
                "the settings that produced it")


def judge(stamp: Path, settings: dict[str, Any], legacy: Callable[[], dict[str, Any] | None]) -> Verdict:
    """Compare the stamp at ``stamp`` with ``settings``; without a stamp, with ``legacy()`` (the settings
    ``results.json`` records for the same work, None when it cannot tell)."""
    saved = read_stamp(stamp)
    if saved is not None:
        if saved.fingerprint == fingerprint(settings):
            return Verdict("same")
        return Verdict("changed", tuple(changed_keys(saved.settings, settings)))
    old = legacy()
    if old is None:
        return Verdict("unknown")
    if fingerprint(old) == fingerprint(settings):
        return Verdict("adopted")
    return Verdict("changed", tuple(changed_keys(old, settings)))


def reusable_artefact(path: Path, settings: dict[str, Any], legacy: Callable[[], dict[str, Any] | None],
                      what: str, also: tuple[Path, ...] = ()) -> bool:
    """Whether the cached file ``path`` was built with ``settings``. When it was not (or it is missing) the
    file and ``also`` (its companions, e.g. a model card) are removed and the new stamp is written, so the
    caller builds it afresh; a stale file is named in a warning."""
    stamp = stamp_beside(path)
    if path.exists():
        verdict = judge(stamp, settings, legacy)
        if verdict.reusable:
            if verdict.state == "adopted":
                write_stamp(stamp, settings)
            return True
        log.warning("%s %s is rebuilt: %s", what, path, verdict.why())
    for p in (path, *also):
        p.unlink(missing_ok=True)
    write_stamp(stamp, settings)
    return False


@dataclass
class PreviousRun:
    """What ``OUT/results.json`` (written at the end of the last run) tells about work saved without stamps:
    the campaign ``config`` and ``name`` it recorded, the cells and honest-user cost records it listed, when that run
    started (``started``, epoch seconds) and when it wrote the file (``written``), and its times."""

    config: CampaignConfig | None = None
    name: str | None = None
    cell_ids: set[str] = field(default_factory=set)
    utility: set[tuple[str, str]] = field(default_factory=set)
    created_at: str | None = None
    wall_times: dict[str, float] = field(default_factory=dict)
    started: float | None = None
    written: float | None = None

    def made_it(self, evidence: Path) -> bool:
        """Whether ``evidence`` (a file the work wrote when it was made) dates from the run that wrote
        results.json, whose config then describes it."""
        if self.config is None or self.started is None or self.written is None:
            return False
        try:
            mtime = evidence.stat().st_mtime
        except OSError:
            return False
        return self.started - 1.0 <= mtime <= self.written + 1.0

    def cell_settings(self, kind: CellKind, plan_id: str, evidence: Path) -> dict[str, Any] | None:
        """The settings ``kind`` gives cell ``plan_id`` under the recorded config, when that run made the cell
        (``evidence``: its ``attempts`` file, written as each attempt begins); None: cannot tell."""
        if plan_id not in self.cell_ids or not self.made_it(evidence):
            return None
        for entry in self.entries(kind.name):
            for plan in kind.plan(self.config, entry):  # type: ignore[arg-type]
                if plan.id == plan_id:
                    return _guarded(functools.partial(kind.settings, self.config, entry, plan))
        return None

    def recorded(self, make: Callable[[CampaignConfig], dict[str, Any] | None], evidence: Path,
                 listed: bool = True) -> dict[str, Any] | None:
        """``make(config)`` under the recorded config for an artefact that run made (``evidence``: the file)
        and results.json accounts for (``listed``); None when it cannot tell, or that config no longer fits."""
        if self.config is None or not listed or not self.made_it(evidence):
            return None
        return _guarded(functools.partial(make, self.config))

    def entries(self, kind: str) -> list[Any]:
        """The recorded config's entries of ``kind`` (none without a config)."""
        return [e for e in self.config.entries() if e.kind == kind] if self.config is not None else []


def _guarded(make: Callable[[], dict[str, Any] | None]) -> dict[str, Any] | None:
    """``make()``, or None when the recorded config no longer fits (a victim or defense it lacks)."""
    try:
        return make()
    except (KeyError, ValueError, StopIteration, AttributeError):
        return None


def previous_run(out: Path) -> PreviousRun:
    """:class:`PreviousRun` of ``out/results.json`` (empty when there is none or it cannot be read)."""
    path = out / "results.json"
    try:
        mtime = path.stat().st_mtime_ns
    except OSError:
        return PreviousRun()
    return _read_previous(str(path.resolve()), mtime)


def _epoch(iso: Any) -> float | None:
    try:
        return _dt.datetime.fromisoformat(str(iso)).timestamp()
    except ValueError:
        return None


@functools.lru_cache(maxsize=4)
def _read_previous(path: str, mtime_ns: int) -> PreviousRun:
    from pydantic import ValidationError

    from evaluation.campaign.config import CampaignConfig
    from translators.errors import HeistError

    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return PreviousRun()
    if not isinstance(raw, dict):
        return PreviousRun()
    try:
        config: CampaignConfig | None = CampaignConfig.model_validate(raw.get("config") or {})
    except (ValidationError, HeistError, ValueError):
        config = None  # recorded by a Heist whose schema differs: it cannot tell
    cells = [c for c in raw.get("cells") or [] if isinstance(c, dict)]
    utility = [u for u in raw.get("utility") or [] if isinstance(u, dict)]
    times = raw.get("wall_times") if isinstance(raw.get("wall_times"), dict) else {}
    created = raw.get("created_at") if isinstance(raw.get("created_at"), str) else None
    wall = {str(k): float(v) for k, v in times.items() if isinstance(v, int | float)}
    name = raw.get("name") if isinstance(raw.get("name"), str) else None
    return PreviousRun(config=config, name=name, cell_ids={str(c.get("id")) for c in cells},
                       utility={(str(u.get("victim")), str(u.get("defense"))) for u in utility},
                       created_at=created, started=_run_start(created, raw.get("finished_at"), wall),
                       written=mtime_ns / 1e9, wall_times=wall)


def _run_start(created_at: str | None, finished_at: Any, wall_times: dict[str, float]) -> float | None:
    """When the run that wrote a results.json started (epoch seconds): ``finished_at - total`` (``created_at`` was
    set after the zoo builds and model-level defenses), else ``created_at``."""
    starts = [t for t in (_epoch(created_at) if created_at else None,) if t is not None]
    end = _epoch(finished_at) if isinstance(finished_at, str) else None
    if end is not None and "total" in wall_times:
        starts.append(end - wall_times["total"])
    return min(starts) if starts else None


__all__ = ["PreviousRun", "Stamp", "Verdict", "canonical_json", "changed_keys", "fingerprint", "judge",
           "previous_run", "read_stamp", "reusable_artefact", "secret_digest", "stamp_beside", "write_stamp"]
