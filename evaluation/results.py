"""The ``results.json`` schema: every number a Heist report shows lives in one of these models.

One document type, :class:`Results`, serves both producers:

- ``heist eval extraction`` fills :attr:`Results.extraction` (the paper's A/B/C tables);
- the campaign runner fills :attr:`Results.victims`, :attr:`Results.defenses`, :attr:`Results.cells`,
  :attr:`Results.utility` and :attr:`Results.samples`, then calls
  :func:`evaluation.defense_scoring.derive` to fill :attr:`Results.derived` (curves, Pareto fronts,
  queries-to-target) before writing the file.

The report renderer (:mod:`evaluation.report`) reads only this file (and the sample PNGs it names),
so each number in ``report.md``/``report.html`` can be traced to a field here. Units: PSNR in dB,
SSIM/MS-SSIM unitless, times in seconds, memory in MiB, budgets and queries in requests.
``docs/evaluation.md`` documents the schema for users.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import socket
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from evaluation.errors import ResultsError
from evaluation.features import FeatureNetworkInfo
from evaluation.fid import FIDResult, KIDResult, NKIDResult
from evaluation.metrics import MetricSettings
from evaluation.stats import ScoreSummary, TOSTResult, WelchResult
from translators.errors import first_problem
from translators.files import atomic_write_text

SCHEMA_VERSION = 2  # 2: cells carry a ``kind`` (extraction, membership, monitor, watermark); v1 upgraded on read
CellStatus = Literal["pending", "running", "done", "failed"]
ExtractionCellName = Literal["A", "B", "C"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --- building blocks ------------------------------------------------------------------------------


class Environment(_Model):
    """Versions and machine the results were computed with."""

    heist: str = ""
    python: str = ""
    platform: str = ""
    hostname: str = ""
    device: str = "cpu"
    git_commit: str | None = None
    packages: dict[str, str] = Field(default_factory=dict)

    @classmethod
    def capture(cls, device: str = "cpu") -> Environment:
        """The current interpreter, platform, git commit (if any) and key package versions."""
        pkgs = {}
        for name in ("torch", "torchvision", "numpy", "scipy", "piq", "scikit-image", "pydantic", "matplotlib"):
            try:
                pkgs[name] = metadata.version(name)
            except metadata.PackageNotFoundError:
                continue
        try:
            heist = metadata.version("i2i-heist")
        except metadata.PackageNotFoundError:
            heist = "unknown"
        return cls(heist=heist, python=platform.python_version(), platform=platform.platform(),
                   hostname=socket.gethostname(), device=device, git_commit=_git_commit(), packages=pkgs)


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


class ModelRef(_Model):
    """A model that was evaluated: where it came from and what it does (never its weights)."""

    name: str
    path: str | None = None
    url: str | None = None
    task: str = "translation"
    scale: int = 1
    arch: str | None = None


class MetricScores(_Model):
    """One metric on one comparison: summary and per-image scores (``{image name: score}``)."""

    metric: str
    unit: str = ""
    higher_is_better: bool = True
    summary: ScoreSummary
    per_image: dict[str, float] | None = None


class Comparison(_Model):
    """Outputs compared with references image by image (PSNR/SSIM/MS-SSIM) and as sets (FID/KID).

    ``output``/``reference`` name the two sides, e.g. ``surrogate`` vs ``victim``. ``notes`` says
    why a metric is missing (image too small for MS-SSIM, no feature network for FID...).
    """

    output: str
    reference: str
    image_set: str
    n_images: int
    metrics: dict[str, MetricScores] = Field(default_factory=dict)
    fid: FIDResult | None = None
    kid: KIDResult | None = None
    nkid: NKIDResult | None = None
    notes: list[str] = Field(default_factory=list)

    def mean(self, metric: str) -> float | None:
        m = self.metrics.get(metric)
        return m.summary.mean if m else None


class ScoreTests(_Model):
    """Victim vs surrogate quality scores on one metric: Welch's t-test and TOST equivalence."""

    metric: str
    a_label: str = "victim vs ground truth (A)"
    b_label: str = "surrogate vs ground truth (C)"
    welch: WelchResult
    tost: TOSTResult


class GridRow(_Model):
    name: str
    images: dict[str, str]


class ImageGrid(_Model):
    """Sample images side by side; ``rows[i].images[column]`` is a PNG path relative to results.json."""

    title: str
    columns: list[str]
    rows: list[GridRow]
    victim: str | None = None
    defense: str | None = None
    budget: int | None = None
    strategy: str | None = None


# --- extraction (the paper's A/B/C table) -------------------------------------------------------------


class ExtractionTestSet(_Model):
    """A/B/C cells on one image set (the victim's test split or an independent benchmark)."""

    name: str
    spec: str
    n_images: int
    image_names: list[str]
    cells: dict[ExtractionCellName, Comparison]
    tests: dict[str, ScoreTests] = Field(default_factory=dict)


class ExtractionTable(_Model):
    """The extraction paper's table: A victim vs ground truth, B surrogate vs victim, C surrogate vs GT."""

    victim: ModelRef
    surrogate: ModelRef
    task: str
    pair_source: str
    d_bound: float
    alpha: float
    test_sets: list[ExtractionTestSet]


# --- campaigns --------------------------------------------------------------------------------------


class VictimEntry(_Model):
    """A victim model in the campaign grid."""

    name: str
    model: ModelRef
    recipe: str | None = None


class DefenseEntry(_Model):
    """A defense configuration; ``name`` ``none`` is the undefended baseline. ``label`` is unique."""

    label: str
    name: str
    params: dict[str, Any] = Field(default_factory=dict)


class SurrogateTraining(_Model):
    """How a cell's surrogate was trained (from ``attacker.train``'s summary). Campaigns give training a time
    budget, so the steps a machine managed within it decide the surrogate as much as the queries do: the
    report names them so that cells from different machines can be compared."""

    steps: int  # optimisation steps of the kept surrogate kind
    stop_reason: str | None = None  # "time" (budget spent), "plateau" (held-out fidelity stopped improving), "steps"
    time_budget_s: float | None = None
    train_s: float | None = None  # seconds spent in the optimisation loop
    device: str | None = None
    amp_dtype: str | None = None  # autocast dtype (bfloat16 on CPUs with its kernels), None for float32

    @classmethod
    def from_summary(cls, summary: dict[str, Any]) -> SurrogateTraining:
        """Pick the fields from ``TrainResult.summary`` (``run.json``'s ``train``)."""
        return cls(steps=int(summary["steps"]), stop_reason=summary.get("stop_reason"),
                   time_budget_s=summary.get("time_budget_s"), train_s=summary.get("train_s"),
                   device=summary.get("device"), amp_dtype=summary.get("amp_dtype"))

    def describe(self) -> str:
        """``"1455 steps, stopped on the time budget (300 s budget, bfloat16)"``."""
        why = {"time": "on the time budget", "plateau": "on a plateau", "steps": "at the step limit"}
        bits = [b for b in (f"{self.time_budget_s:g} s budget" if self.time_budget_s else None, self.amp_dtype) if b]
        stop = f", stopped {why.get(self.stop_reason, self.stop_reason)}" if self.stop_reason else ""
        return f"{self.steps} steps{stop}" + (f" ({', '.join(bits)})" if bits else "")


class CampaignCell(_Model):
    """One extraction attack: victim x defense x budget x strategy (cell kind ``extraction``).

    ``fidelity``: surrogate vs the *clean* (undefended) victim on the benchmark images (the attack's
    success). ``quality``: surrogate vs ground truth. ``id`` is ``victim/defense/budget/strategy``.
    """

    kind: Literal["extraction"] = "extraction"
    id: str
    victim: str
    defense: str
    budget: int
    strategy: str
    seed: int = 0
    status: CellStatus = "pending"
    error: str | None = None
    queries_used: int | None = None  # requests the victim answered, 429s and transport errors excepted (all sessions)
    queries_refused: int | None = None  # 429 answers (rate limit or quota)
    wall_times: dict[str, float] = Field(default_factory=dict)
    surrogate: ModelRef | None = None
    run_dir: str | None = None
    fidelity: Comparison | None = None
    quality: Comparison | None = None
    input_pixels: int | None = None  # input pixels the harvest sent (the single-example paper's x axis)
    surrogate_kind: str | None = None  # what `auto` chose, or the configured kind
    receptive_field: int | None = None  # measured receptive field side of the surrogate (same-size tasks)
    attacker: Literal["plain", "adaptive"] = "plain"  # plain: trains on the outputs as harvested
    counter: str | None = None  # adaptive: the counter-measure whose surrogate scored best (attacker.countermeasures)
    counter_fidelity: dict[str, float] = Field(
        default_factory=dict,
        description="adaptive: counter-measure spec -> PSNR (dB) of its surrogate to the clean victim")
    training: SurrogateTraining | None = None  # the kept surrogate's steps and stop (absent in older results)


class PaperComparison(_Model):
    """One published number beside ours: ``ours`` is None (with ``note``) when we cannot measure it."""

    label: str
    victim: str
    cell: str
    metric: str
    budget: int | None = None
    paper: float | str
    ours: float | None = None
    note: str = ""


ExtractionCell = CampaignCell


class RocCurve(_Model):
    """A ROC curve: false- and true-positive rates at every threshold (both ascending, from (0, 0))."""

    fpr: list[float]
    tpr: list[float]


class MembershipScores(_Model):
    """One membership-inference score (higher = more likely a member) over all candidates.

    ``auc``: area under the ROC curve (0.5 = guessing); ``tpr_at_fpr``: TPR at FPR ``"0.01"`` and
    ``"0.001"`` (the largest TPR whose FPR does not exceed the level; Carlini et al. 2022 "from first
    principles"); ``per_candidate``: candidate name -> score.
    """

    score: str
    auc: float
    tpr_at_fpr: dict[str, float]
    n_members: int
    n_non_members: int
    roc: RocCurve
    per_candidate: dict[str, float] = Field(default_factory=dict)


class MembershipUtility(_Model):
    """Served output vs ground truth on members (training pairs) and non-members (held-out pairs).

    ``gap_psnr_db``: member PSNR minus non-member PSNR; ``generalisation_gap_nkid``: the
    akd-membership-privacy paper's eq. 6 with Q = NKID, ``NKID(train) - NKID(test)`` (needs a feature
    network). NKID in percent of the KID of black images. ``*_heldout``: the same on ``heldout_pairs``
    pairs of the task that no model trained on (a larger test set; None when not measured).
    """

    psnr_members: float
    psnr_non_members: float
    ssim_members: float
    ssim_non_members: float
    gap_psnr_db: float
    nkid_non_members: NKIDResult | None = None
    nkid_members: NKIDResult | None = None
    generalisation_gap_nkid: float | None = None
    heldout_pairs: int = 0
    psnr_heldout: float | None = None
    ssim_heldout: float | None = None
    nkid_heldout: NKIDResult | None = None
    notes: list[str] = Field(default_factory=list)


class MembershipCell(_Model):
    """One membership-inference attack on one served model (cell kind ``membership``).

    ``model_defense``: the model-level defense that produced the served checkpoint (``none`` = the
    victim itself, ``akd``, ``dmp``, ``dpsgd-...``); ``defense``: the output-defense label (tier).
    ``scores``: one entry per attack score (``l1``, ``l2``, ``calibrated``).
    """

    kind: Literal["membership"] = "membership"
    id: str
    victim: str
    model: str
    model_defense: str = "none"
    defense: str = "none"
    seed: int = 0
    status: CellStatus = "pending"
    error: str | None = None
    queries_used: int | None = None
    wall_times: dict[str, float] = Field(default_factory=dict)
    run_dir: str | None = None
    headline: str = "calibrated"
    scores: dict[str, MembershipScores] = Field(default_factory=dict)
    utility: MembershipUtility | None = None

    def headline_scores(self) -> MembershipScores | None:
        return self.scores.get(self.headline) or next(iter(self.scores.values()), None)


class MonitorTimelinePoint(_Model):
    """The monitor's view of one client right after its ``query``-th query (``GET .../risk``)."""

    query: int
    status: int | None = None  # HTTP status of that query (None: transport error)
    risk: float
    level: int
    flagged: bool


class MonitorCostPoint(_Model):
    """One extraction attacker of the cost curve: ``budget`` queries on a fresh key, a surrogate trained on
    the answers, its PSNR to the clean victim (dB, benchmark images), and what the monitor did to the key."""

    budget: int
    queries_used: int | None = None
    psnr: float | None = None
    flagged_at_query: int | None = None
    level: int | None = None
    cell_id: str = ""
    training: SurrogateTraining | None = None  # the surrogate's steps and stop (absent in older results)


class MonitorCell(_Model):
    """The query monitor against a benign population and attackers, on one tier (cell kind ``monitor``).

    ``defense``: the defense label of the tier every client of the cell uses; ``escalation``: whether that
    tier has escalation levels (the monitor's level changes what flagged clients get). ``benign`` and
    ``attackers`` are :func:`evaluation.monitor_eval.evaluate_live`'s summaries (``queries_to_detection``:
    the attacker's total queries when its first key was flagged, None = never; benign ``fpr`` = flagged /
    clients, ``escalated`` = clients whose level rose). ``roc``: threshold sweep over the final risk of
    benign clients (negatives) vs attackers (positives, max over their keys). ``timeline``: one attacker's
    risk and level query by query. ``cost``: surrogate PSNR per query budget; ``queries_to_target``:
    answered queries to reach ``target_psnr``, interpolated between budgets (None: not within the largest
    budget). ``escalation_ratio``: this cell's queries to target over those of the same victim's cell
    without escalation (``ratio_lower_bound``: the target was not reached here, so the ratio is at least the
    value shown).
    """

    kind: Literal["monitor"] = "monitor"
    id: str
    victim: str
    defense: str
    escalation: bool = False
    seed: int = 0
    status: CellStatus = "pending"
    error: str | None = None
    queries_used: int | None = None
    wall_times: dict[str, float] = Field(default_factory=dict)
    run_dir: str | None = None
    benign: dict[str, Any] = Field(default_factory=dict)
    attackers: list[dict[str, Any]] = Field(default_factory=list)
    caught_up: bool | None = None
    roc: RocCurve | None = None
    roc_auc: float | None = None
    roc_thresholds: list[float] = Field(default_factory=list)
    timeline: list[MonitorTimelinePoint] = Field(default_factory=list)
    timeline_client: str | None = None
    cost: list[MonitorCostPoint] = Field(default_factory=list)
    target_psnr: float | None = None
    queries_to_target: float | None = None
    escalation_ratio: float | None = None
    ratio_lower_bound: bool = False


class TraceScore(_Model):
    """``trace_watermark`` read back from a cell's harvested outputs, as the attacker stored them.

    Each output is traced (:func:`defenses.watermark.trace.identify`) against every key name of the
    campaign's victim service: ``identified`` named the harvesting key, ``misattributed`` named another
    key, ``unnamed`` named none (nearest candidate not under ``max_false_match``), ``too_small`` had a side
    under 32 px. ``rate`` = identified / images. On an unmarked tier every answer should be ``unnamed``
    (the trace's false-match calibration).
    """

    harvester: str | None
    images: int
    identified: int
    misattributed: int
    unnamed: int
    too_small: int = 0
    rate: float | None
    candidates: int
    max_false_match: float
    median_distance: float | None = Field(None, description="median Hamming distance to the harvester's 56 code bits")


class OwnershipScore(_Model):
    """``heist defend verify`` of the cell's surrogate against the clean victim (:mod:`evaluation.watermark`).

    ``p_value``: one-sided p for "trained on outputs carrying ownership key ``key_id``" from the ``cosine``
    statistic (None in records written before it; their p came from ``z`` alone); ``null`` states
    the null hypothesis; ``probes`` images of ``probe_side`` px from ``probe_images``, with Gaussian noise of
    ``probe_noise`` ([0, 1] units) added.
    """

    p_value: float
    z: float
    max_z: float | None = None
    cosine: float | None = None
    probes: int
    probe_side: int
    probe_images: str
    probe_noise: float = 0.0
    key_id: str
    radius: int
    source: str
    null: str
    seconds: float | None = None


class WatermarkCell(_Model):
    """One watermark experiment (cell kind ``watermark``): victim x defense x thief counter-measure.

    The thief harvests ``budget`` queries through the defense's tier and trains a surrogate (with the
    counter-measure ``counter`` applied to the harvested outputs). ``fidelity``: surrogate vs the clean
    victim; ``trace``: the harvest's outputs traced to a key; ``ownership``: the verify test of the
    surrogate; ``calibration_p_value``: the same test on the surrogate of the undefended victim (defense
    ``none``, same victim and counter-measure): the innocent case.
    """

    kind: Literal["watermark"] = "watermark"
    id: str
    victim: str
    defense: str
    counter: str = "none"
    budget: int
    strategy: str = "crops"
    seed: int = 0
    status: CellStatus = "pending"
    error: str | None = None
    queries_used: int | None = None
    queries_refused: int | None = None
    wall_times: dict[str, float] = Field(default_factory=dict)
    run_dir: str | None = None
    surrogate: ModelRef | None = None
    surrogate_kind: str | None = None
    training: SurrogateTraining | None = None  # the surrogate's steps and stop (absent in older results)
    ownership_marked: bool = False  # the defense embeds ownership_watermark (else the surrogate is innocent)
    trace_marked: bool = False  # the defense embeds trace_watermark
    fidelity: Comparison | None = None
    quality: Comparison | None = None
    trace: TraceScore | None = None
    ownership: OwnershipScore | None = None
    calibration_p_value: float | None = None


AnyCell = Annotated[CampaignCell | MembershipCell | MonitorCell | WatermarkCell, Field(discriminator="kind")]


class DefenseUtility(_Model):
    """What one defense costs honest users of one victim.

    ``defended_vs_clean``: defended output vs the clean output of the same victim (identical images
    score 80 dB PSNR: piq's epsilon). ``quality_clean``/``quality_defended``: victim output vs ground
    truth without/with the defense.
    """

    victim: str
    defense: str
    defended_vs_clean: Comparison
    quality_clean: Comparison | None = None
    quality_defended: Comparison | None = None


class CurvePoint(_Model):
    budget: int
    queries: int
    value: float
    ci_low: float | None = None
    ci_high: float | None = None
    cell_id: str


class FidelityCurve(_Model):
    """Surrogate fidelity to the clean victim against queries, for one victim/defense/strategy."""

    victim: str
    defense: str
    strategy: str
    metric: str
    points: list[CurvePoint]


class QueriesToTarget(_Model):
    """Queries an attack needed to reach ``target`` (linear interpolation between measured budgets).

    ``queries`` is None when no measured point reached the target (``max_queries`` were not enough).
    ``at_first_point`` is True when the smallest measured budget already reached it (the true need is
    then at most ``queries``).
    """

    victim: str
    defense: str
    strategy: str
    metric: str
    target: float
    queries: float | None
    reached: bool
    at_first_point: bool = False
    max_queries: int


class DefenseRow(_Model):
    """One row of a victim's defense table (means over benchmark images)."""

    victim: str
    defense: str
    honest_psnr: float | None = Field(None, description="defended vs clean victim output, dB")
    honest_ssim: float | None = None
    quality_clean_psnr: float | None = Field(None, description="victim vs ground truth without defense, dB")
    quality_defended_psnr: float | None = Field(None, description="victim vs ground truth with defense, dB")
    utility_cost_db: float | None = Field(None, description="quality_clean_psnr - quality_defended_psnr")
    attacker_psnr: dict[str, float | None] = Field(default_factory=dict,
                                                   description="budget -> surrogate PSNR to clean victim")
    attack_degradation_db: dict[str, float | None] = Field(
        default_factory=dict, description="budget -> attacker PSNR without defense minus with it")
    strategy: str | None = None
    pareto_optimal: bool = False


class ParetoFront(_Model):
    """Defenses of one victim on the front of (minimise utility cost, maximise attack degradation)."""

    victim: str
    strategy: str | None
    budget: int
    x_metric: str = "utility_cost_db"
    y_metric: str = "attack_degradation_db"
    points: dict[str, tuple[float, float]]
    front: list[str]


class AttackerRow(_Model):
    """One victim x defense x attacker row of the perturbation table (means over benchmark images).

    ``loss_db``: budget -> fidelity of the same attacker against the undefended victim (defense ``none``)
    minus fidelity here, dB (positive = the defense slowed this attacker). ``counter``: budget -> the
    counter-measure the adaptive attacker's best surrogate used.
    """

    victim: str
    defense: str
    attacker: str
    strategy: str | None = None
    honest_psnr: float | None = Field(None, description="defended vs clean victim output, dB")
    attacker_psnr: dict[str, float | None] = Field(default_factory=dict)
    loss_db: dict[str, float | None] = Field(default_factory=dict)
    counter: dict[str, str | None] = Field(default_factory=dict)


class BestDefense(_Model):
    """The defense with the largest attacker fidelity loss at ``budget`` among those with honest PSNR
    >= ``min_honest_psnr``, against ``attacker``; ``defense`` is None when no defense qualifies."""

    victim: str
    attacker: str
    budget: int
    min_honest_psnr: float
    defense: str | None = None
    loss_db: float | None = None
    honest_psnr: float | None = None


class Derived(_Model):
    """Summaries computed from the cells by :func:`evaluation.defense_scoring.derive`."""

    target_metric: str = "psnr"
    target_value: float = 25.0
    curves: list[FidelityCurve] = Field(default_factory=list)
    queries_to_target: list[QueriesToTarget] = Field(default_factory=list)
    defense_table: list[DefenseRow] = Field(default_factory=list)
    pareto: list[ParetoFront] = Field(default_factory=list)
    attacker_table: list[AttackerRow] = Field(default_factory=list)
    best_defenses: list[BestDefense] = Field(default_factory=list)


# --- the document -----------------------------------------------------------------------------------


class Results(_Model):
    """A whole ``results.json``. ``kind`` is ``extraction`` or ``campaign``."""

    schema_version: int = SCHEMA_VERSION
    kind: Literal["extraction", "campaign"]
    name: str
    created_at: str = Field(default_factory=lambda: _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"))
    finished_at: str | None = None
    command: str | None = None
    config: dict[str, Any] = Field(default_factory=dict)
    config_text: str | None = None
    config_path: str | None = None
    environment: Environment = Field(default_factory=Environment)
    seeds: dict[str, int] = Field(default_factory=dict)
    wall_times: dict[str, float] = Field(default_factory=dict)
    peak_memory_mb: float | None = None
    metric_settings: MetricSettings = Field(default_factory=MetricSettings)
    feature_network: FeatureNetworkInfo | None = None
    feature_network_note: str | None = None
    extraction: list[ExtractionTable] = Field(default_factory=list)
    victims: list[VictimEntry] = Field(default_factory=list)
    defenses: list[DefenseEntry] = Field(default_factory=list)
    budgets: list[int] = Field(default_factory=list)
    strategies: list[str] = Field(default_factory=list)
    cells: list[AnyCell] = Field(default_factory=list)
    utility: list[DefenseUtility] = Field(default_factory=list)
    samples: list[ImageGrid] = Field(default_factory=list)
    derived: Derived | None = None
    paper_source: str | None = None
    paper: list[PaperComparison] = Field(default_factory=list)

    @property
    def extraction_cells(self) -> list[CampaignCell]:
        return [c for c in self.cells if isinstance(c, CampaignCell)]

    @property
    def membership_cells(self) -> list[MembershipCell]:
        return [c for c in self.cells if isinstance(c, MembershipCell)]

    @property
    def monitor_cells(self) -> list[MonitorCell]:
        return [c for c in self.cells if isinstance(c, MonitorCell)]

    @property
    def watermark_cells(self) -> list[WatermarkCell]:
        return [c for c in self.cells if isinstance(c, WatermarkCell)]


def upgrade(raw: dict[str, Any]) -> dict[str, Any]:
    """Bring an older ``results.json`` document up to :data:`SCHEMA_VERSION` (version 1: cells had no kind)."""
    version = int(raw.get("schema_version", 1))
    if version < 2:
        raw = {**raw, "cells": [{"kind": "extraction", **c} if isinstance(c, dict) else c
                                for c in raw.get("cells", [])], "schema_version": SCHEMA_VERSION}
    return raw


def write_results(results: Results, path: str | os.PathLike[str]) -> Path:
    """Write ``results`` as indented JSON atomically (temp file + ``os.replace``)."""
    return atomic_write_text(path, results.model_dump_json(indent=2))


def read_results(path: str | os.PathLike[str]) -> Results:
    """Load and validate a ``results.json``; raises :class:`ResultsError` with the first problem."""
    p = Path(path)
    if p.is_dir():
        p = p / "results.json"
    try:
        raw = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ResultsError(f"{p}: no such results file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ResultsError(f"{p}: not valid JSON ({exc})") from None
    if isinstance(raw, dict) and raw.get("schema_version", SCHEMA_VERSION) > SCHEMA_VERSION:
        raise ResultsError(f"{p}: schema version {raw['schema_version']} is newer than this Heist "
                           f"({SCHEMA_VERSION}); upgrade Heist")
    if isinstance(raw, dict):
        raw = upgrade(raw)
    try:
        return Results.model_validate(raw)
    except ValidationError as exc:
        raise ResultsError(f"{p}: invalid results ({first_problem(exc)})") from None
