"""The campaign file: a validated pydantic model, with mistakes reported at their line in the TOML file.

Example (``configs/campaigns/demo.toml`` is the full one)::

    [campaign]
    name = "demo"
    zoo_profile = "default"

    [limits]                 # the tier every attacker key gets: honest API limits
    rate = 20.0              # requests per second
    burst = 10
    quota_total = 1000

    [[victims]]
    name = "sr4x"            # a zoo model (source defaults to zoo:NAME@PROFILE)

    [[defenses]]
    label = "none"           # the undefended baseline (an empty pipeline)
    [[defenses]]
    label = "jpeg75"
    pipeline = [{ name = "jpeg", quality = 75 }]

    [attack]                 # shorthand for one [[cells]] entry of kind "extraction"
    budgets = [4, 16, 64]
    strategies = ["crops"]

    [[cells]]                # any cell kind (evaluation/campaign/kinds); its keys are checked per kind
    kind = "membership"
    victim = "mia-edges"

Cell kinds: ``[[cells]]`` entries are validated by the schema of their ``kind``
(:data:`evaluation.campaign.kinds.CELL_KINDS`); a key of another kind is reported at its line.
"""

from __future__ import annotations

import difflib
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from evaluation.campaign.kinds import CELL_KINDS, owner_of
from evaluation.campaign.kinds.base import check_images, check_surrogate
from evaluation.campaign.kinds.extraction import AttackSection
from evaluation.campaign.tomlpos import locate
from translators.errors import HeistError


class CampaignConfigError(HeistError):
    """An invalid campaign file; the message starts with ``FILE:LINE:``."""

    code = "bad_campaign"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CampaignSection(_Strict):
    """Run-wide settings. ``out_dir`` defaults to ``runs/NAME`` (relative to the working directory)."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    seed: int = 0
    out_dir: Path | None = None
    zoo_profile: Literal["tiny", "default", "full"] = "tiny"
    device: str = "auto"
    description: str = ""

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        """A device name :func:`translators.device.pick_device` knows. CUDA missing *here* is no mistake: the
        file may be checked on another machine than the GPU one that runs it."""
        import torch

        from translators.device import DeviceError, pick_device

        try:
            pick_device(v)
        except DeviceError as exc:
            try:
                cuda = torch.device(v.lower()).type == "cuda"
            except RuntimeError:
                cuda = False
            if not cuda:
                raise ValueError(str(exc)) from None
        return v


class VictimServiceSection(_Strict):
    """Where the victim runs. Without ``url`` the campaign starts ``heist serve`` itself on a free port.

    With ``url`` every defense entry must name the ``api_key`` of a client whose tier applies that
    defense on the remote service (see ``configs/campaigns/compose.toml``).
    """

    url: str | None = None
    workers: int = Field(1, ge=1, le=16)
    redis_url: str | None = Field(None, description="None = the service's embedded in-process limiter")
    startup_timeout_s: float = Field(600.0, gt=0)
    max_batch: int | Literal["auto"] = 1

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, v: str | None) -> str | None:
        """The check ``heist serve`` applies (:class:`victim_service.settings.Settings`)."""
        from victim_service.settings import Settings, SettingsError

        if v is None:
            return v
        try:
            return Settings.from_mapping({"redis_url": v}, "victim service", env=False).redis_url
        except SettingsError as exc:
            raise ValueError(str(exc).removeprefix("victim service: redis_url: ")) from None


class LimitsSection(_Strict):
    """The limits of the attacker's tier (GCRA rate and burst, quotas). ``None`` = unlimited."""

    rate: float | None = Field(20.0, gt=0)
    burst: int = Field(10, ge=1)
    quota_total: int | None = Field(None, ge=1)
    quota_daily: int | None = Field(None, ge=1)


class VictimSection(_Strict):
    """One victim model.

    ``source`` defaults to the zoo model ``recipe`` (itself defaulting to ``name``) at the campaign's
    profile; a checkpoint path serves your own model. ``recipe`` is the zoo recipe whose ``make_pair``
    gives the ground truth (the degradation or hidden style). ``surrogate``: the attacker's surrogate kind
    (``auto`` = the task's default); ``surrogate_profile`` and ``train_steps`` size its training.
    """

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    source: str | None = None
    recipe: str | None = None
    surrogate: str = "auto"
    surrogate_profile: str = "tiny"
    train_steps: int | None = Field(None, ge=1)
    surrogate_kwargs: dict[str, int | float | bool | str] = Field(
        default_factory=dict, description="overrides of the surrogate's architecture kwargs (e.g. levels)")
    train_time_s: float | None = Field(None, gt=0, description="training time budget per cell (None: 300 s)")

    @field_validator("surrogate")
    @classmethod
    def _surrogate(cls, v: str) -> str:
        if v != "auto":
            from attacker.surrogates.base import get_surrogate

            try:
                get_surrogate(v)
            except HeistError as exc:
                raise ValueError(str(exc)) from None
        return v

    @model_validator(mode="after")
    def _recipe(self) -> VictimSection:
        from translators.zoo import ZOO

        if (self.recipe or self.name) not in ZOO:
            raise ValueError(f"victim {self.name!r}: no zoo recipe {self.recipe or self.name!r} gives its ground "
                             f"truth; set recipe to one of {', '.join(ZOO.names())}")
        try:
            check_surrogate(self.surrogate, self.surrogate_profile, dict(self.surrogate_kwargs),
                            self.recipe or self.name)
        except ValueError as exc:
            raise _located(("surrogate_kwargs",) if self.surrogate_kwargs else ("surrogate_profile",),
                           f"victim {self.name!r}: {exc}") from None
        return self


class DefenseSection(_Strict):
    """A defense configuration: an ordered pipeline of output defenses, ``[]`` for none.

    ``levels``: escalation levels 1, 2, ... of the attack tier (what the query monitor raises a flagged
    client to; see ``docs/monitor.md``): each a list of defenses that level adds or strengthens.
    """

    label: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    pipeline: list[dict[str, Any]] = Field(default_factory=list)
    levels: list[list[dict[str, Any]]] = Field(default_factory=list)
    api_key: str | None = Field(None, description="only with [victim_service].url: a key in a tier with this defense")

    @field_validator("pipeline")
    @classmethod
    def _pipeline(cls, v: list[dict[str, Any]]) -> list[dict[str, Any]]:
        from defenses.registry import build_defenses

        try:
            build_defenses(v)
        except HeistError as exc:
            raise ValueError(str(exc)) from None
        return v

    @field_validator("levels")
    @classmethod
    def _levels(cls, v: list[list[dict[str, Any]]]) -> list[list[dict[str, Any]]]:
        from defenses.registry import build_defenses

        for i, specs in enumerate(v, start=1):
            if not specs:
                raise ValueError(f"escalation level {i} is empty")
            try:
                build_defenses(specs)
            except HeistError as exc:
                raise ValueError(f"escalation level {i}: {exc}") from None
        return v


class EvaluationSection(_Strict):
    """How surrogates and defenses are scored.

    ``image_sets``: label -> image spec; the first is the headline set. ``max_side`` shrinks evaluation
    images (CPU time). ``target_psnr``: fidelity the "queries to reach" table asks for (dB).
    ``feature_weights``: a local InceptionV3 weights file for FID/KID (omitted = no FID/KID in
    extraction cells, said so). ``feature_network``: the network for the NKID of membership cells
    (a :data:`evaluation.features.FEATURE_NETWORKS` name, or ``"none"``); omitted = InceptionV3 when
    ``feature_weights`` is set or a weights file is found, else the offline ``vgg16-random``.
    """

    image_sets: dict[str, str] = Field(default_factory=lambda: {"benchmark": "corpus:benchmark"}, min_length=1)
    max_side: int = Field(128, ge=16)
    target_psnr: float = Field(30.0, gt=0, allow_inf_nan=False)
    samples: int = Field(3, ge=0, le=16)
    feature_weights: Path | None = None
    feature_network: str | None = None
    d_bound: float = Field(0.3, gt=0)

    @field_validator("image_sets")
    @classmethod
    def _image_sets(cls, v: dict[str, str]) -> dict[str, str]:
        for label, spec in v.items():
            try:
                check_images(spec)
            except ValueError as exc:
                raise ValueError(f"{label}: {exc}") from None
        return v

    @field_validator("feature_network")
    @classmethod
    def _known_network(cls, v: str | None) -> str | None:
        from evaluation.features import FEATURE_NETWORKS, NO_NETWORK

        if v is not None and v != NO_NETWORK and v not in FEATURE_NETWORKS:
            raise ValueError(f"unknown feature network {v!r} (known: {', '.join(FEATURE_NETWORKS.names())}, "
                             f"{NO_NETWORK})")
        return v


class PaperRow(_Strict):
    """One number of a source paper to show beside ours (``[[paper.rows]]``).

    ``cell``: the extraction paper's A (victim vs ground truth), B (surrogate vs victim) or C (surrogate
    vs ground truth); ``budget`` picks the cell (default: the largest budget; defense ``none``).
    ``paper`` is the published value (a number or a range such as ``"20-25"``).
    """

    label: str
    victim: str
    cell: Literal["A", "B", "C"] = "B"
    metric: Literal["psnr", "ssim", "ms_ssim", "fid", "kid"] = "psnr"
    paper: float | str
    budget: int | None = Field(None, ge=1)
    note: str = ""


class PaperSection(_Strict):
    """The source paper a campaign reproduces: its title, the numbers to compare, and which victims get
    the full A/B/C extraction table (Welch + TOST, ``evaluation.d_bound``) at the largest budget."""

    source: str
    rows: list[PaperRow] = Field(default_factory=list)
    extraction: list[str] = Field(default_factory=list)


CellEntry = Annotated[Union[tuple(k.Params for k in CELL_KINDS.values())],  # noqa: UP007 - from the registry
                      Field(discriminator="kind")]


class CampaignConfig(_Strict):
    """A whole campaign file."""

    campaign: CampaignSection
    victim_service: VictimServiceSection = Field(default_factory=VictimServiceSection)
    limits: LimitsSection = Field(default_factory=LimitsSection)
    victims: list[VictimSection] = Field(min_length=1)
    defenses: list[DefenseSection] = Field(min_length=1)
    attack: AttackSection | None = None
    cells: list[CellEntry] = Field(default_factory=list)
    evaluation: EvaluationSection = Field(default_factory=EvaluationSection)
    paper: PaperSection | None = None
    profiles: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="named overrides merged into the file by `--profile NAME`")

    @model_validator(mode="after")
    def _cross_checks(self) -> CampaignConfig:
        extraction = [c for c in self.cells if c.kind == "extraction"]
        if len(extraction) + (self.attack is not None) > 1:
            raise ValueError("one extraction entry at most ([attack] or one [[cells]] with kind = \"extraction\")")
        if self.attack is None and not self.cells:
            raise ValueError("nothing to run: give [attack] (extraction) or [[cells]] entries")
        for i, entry in enumerate(self.cells):
            try:
                entry.check(self)
            except ValueError as exc:
                key = getattr(exc, "key", None)
                raise _located(("cells", i, *([key] if key else [])), str(exc)) from None
        labels = [d.label for d in self.defenses]
        if len(set(labels)) != len(labels):
            raise ValueError("defense labels must be unique")
        baseline = [d for d in self.defenses if d.label == "none"]
        if not baseline or baseline[0].pipeline:
            raise ValueError('one defense must be label = "none" with an empty pipeline: the clean victim that '
                             "honest-user cost and attack fidelity are measured against")
        names = [v.name for v in self.victims]
        if len(set(names)) != len(names):
            raise ValueError("victim names must be unique")
        quota = self.limits.quota_total
        need = self.extraction.budgets[-1] if self.extraction else 0
        if quota is not None and need > quota:
            raise ValueError(f"the largest budget ({need} queries) exceeds the tier's quota_total ({quota}): "
                             "it could never be spent")
        if self.victim_service.url:
            missing = [i for i, d in enumerate(self.defenses) if not d.api_key]
            if missing:
                labels = ", ".join(self.defenses[i].label for i in missing)
                raise _located(("defenses", missing[0]), "with a victim URL ([victim_service].url or --victim-url) "
                               f"every defense needs the api_key of a client in its tier (missing: {labels})")
        if self.paper is not None:
            if self.extraction is None and (self.paper.rows or self.paper.extraction):
                raise ValueError("paper: rows and extraction tables compare extraction cells; give [attack]")
            for name in [r.victim for r in self.paper.rows] + self.paper.extraction:
                if name not in names:
                    raise ValueError(f"paper: {name!r} is not one of the victims ({', '.join(names)})")
        return self

    @property
    def extraction(self) -> AttackSection | None:
        """The extraction entry (``[attack]`` or a ``[[cells]]`` of kind extraction), if any."""
        if self.attack is not None:
            return self.attack
        return next((c for c in self.cells if isinstance(c, AttackSection)), None)

    def entries(self) -> list[Any]:
        """Every cell-kind entry in run order: extraction first, then ``[[cells]]`` as written."""
        ext = self.extraction
        return ([ext] if ext is not None else []) + [c for c in self.cells if c is not ext]

    @property
    def out_dir(self) -> Path:
        return self.campaign.out_dir or Path("runs") / self.campaign.name


def _located(loc: tuple[Any, ...], message: str) -> PydanticCustomError:
    """A cross-check error to raise from a model validator, reported at ``loc`` (a path in the file)."""
    return PydanticCustomError("campaign_check", "{message}", {"message": message, "at": loc})


def _typo_hints(errors: list[Any]) -> tuple[dict[tuple[Any, ...], str], set[tuple[Any, ...]]]:
    """Unknown keys that look like a key of the same table (``[[defense]]`` for ``[[defenses]]``): a missing
    required one there, or a top-level section. Returns ``{unknown key loc: the key meant}`` and the locs of
    the missing-key errors the typos explain."""
    missing = {tuple(e["loc"]) for e in errors if e["type"] == "missing" and e.get("loc")}
    hints: dict[tuple[Any, ...], str] = {}
    explained: set[tuple[Any, ...]] = set()
    for e in errors:
        loc = tuple(e.get("loc", ()))
        if e["type"] != "extra_forbidden" or not loc:
            continue
        near = [str(m[-1]) for m in missing if m[:-1] == loc[:-1]]
        known = near + ([k for k in CampaignConfig.model_fields if k not in near] if len(loc) == 1 else [])
        close = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.75)
        if close:
            hints[loc] = close[0]
            explained |= {m for m in missing if m[:-1] == loc[:-1] and str(m[-1]) == close[0]}
    return hints, explained


def _format_error(path: Path, text: str, exc: ValidationError) -> str:
    lines = []
    errors = exc.errors()
    hints, explained = _typo_hints(errors)
    for err in [e for e in errors if tuple(e.get("loc", ())) not in explained][:5]:
        loc = tuple(err.get("loc", ()))
        at = (err.get("ctx") or {}).get("at") if err["type"] == "campaign_check" else None
        if at:
            loc = (*loc, *at)
        kind = None
        if len(loc) >= 3 and loc[0] == "cells" and loc[2] in CELL_KINDS:  # drop the union's tag from the path
            kind, loc = str(loc[2]), loc[:2] + loc[3:]
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] in ("union_tag_invalid", "union_tag_not_found") and loc[:1] == ("cells",):
            loc = (*loc, "kind")
            tag = (err.get("ctx") or {}).get("tag", "")
            msg = (f"unknown cell kind {tag!r} (known: {', '.join(CELL_KINDS)})" if tag else
                   f"a [[cells]] entry needs kind = one of {', '.join(CELL_KINDS)}")
        line = locate(text, loc) or 1
        where = ".".join(str(x) for x in loc) or "(file)"
        if err["type"] == "extra_forbidden":
            owner = owner_of(str(loc[-1])) if kind else None
            msg = (f"unknown key for a {kind} cell (it belongs to {', '.join(owner)} cells)" if owner else
                   f"unknown key for a {kind} cell" if kind else "unknown key")
            if tuple(err.get("loc", ())) in hints:
                msg += f" (did you mean {hints[tuple(err['loc'])]!r}?)"
        lines.append(f"{path}:{line}: {where}: {msg}")
    return "\n".join(lines)


def merge_profile(raw: dict[str, Any], profile: str) -> dict[str, Any]:
    """``raw`` with ``raw["profiles"][profile]`` merged in: tables merge key by key, arrays of tables
    (``victims``, ``defenses``) merge element by element, anything else is replaced."""

    def merge(a: Any, b: Any) -> Any:
        if isinstance(a, dict) and isinstance(b, dict):
            return {**a, **{k: merge(a[k], v) if k in a else v for k, v in b.items()}}
        if isinstance(a, list) and isinstance(b, list) and a and all(isinstance(x, dict) for x in a + b):
            return [merge(a[i], b[i]) if i < len(b) else a[i] for i in range(len(a))] + b[len(a):]
        return b

    return merge(raw, raw.get("profiles", {}).get(profile, {}))


def parse_campaign(text: str, path: Path | str = "<campaign>", profile: str | None = None, *,
                   victim_url: str | None = None) -> CampaignConfig:
    """Validate campaign TOML ``text``; raises :class:`CampaignConfigError` with ``FILE:LINE:`` positions.

    ``profile`` applies ``[profiles.NAME]`` first (e.g. ``full`` for a GPU-sized run); ``victim_url``
    (``--victim-url``) replaces ``[victim_service].url`` before the file is checked."""
    p = Path(path)
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise CampaignConfigError(f"{p}: invalid TOML: {exc}") from None
    if profile is not None:
        if profile not in raw.get("profiles", {}):
            known = ", ".join(raw.get("profiles", {})) or "none"
            raise CampaignConfigError(f"{p}: no profile {profile!r} (profiles in this file: {known})")
        raw = merge_profile(raw, profile)
    if victim_url:
        section = raw.get("victim_service")
        raw = {**raw, "victim_service": {**(section if isinstance(section, dict) else {}), "url": victim_url}}
    try:
        return CampaignConfig.model_validate(raw)
    except ValidationError as exc:
        raise CampaignConfigError(_format_error(p, text, exc)) from None


def load_campaign(path: str | Path, profile: str | None = None, *,
                  victim_url: str | None = None) -> tuple[CampaignConfig, str]:
    """Read and validate a campaign file (``profile`` and ``victim_url`` as :func:`parse_campaign`); returns the
    config and the file's text (kept in results.json)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise CampaignConfigError(f"{p}: cannot read campaign file ({exc.strerror or exc})") from None
    return parse_campaign(text, p, profile, victim_url=victim_url), text
