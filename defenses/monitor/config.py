"""Validated, frozen parameters of the query monitor: signal thresholds, weights and the escalation policy.

Defaults of the thresholds marked *calibrated* come from benign traffic only
(``evaluation.monitor_eval.calibrate_thresholds`` on ``heist traffic benign``; numbers in ``docs/monitor.md``).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SignalParams(_Frozen):
    """Per-signal thresholds. Distances are L2 between unit :func:`~defenses.monitor.embedding.source_embedding`
    vectors (range [0, 2]).

    Attributes:
        history: embeddings kept per client (the "past queries" of the k-NN and PRADA tests).
        window: recent queries the reuse and k-NN hit rates are measured over.
        dup_distance: two queries closer than this come from one source. The default covers one photo's
            rescaled copies (within 0.10); calibration lowers it to the benign percentile of distances between
            distinct images when a population's images look alike (never raises it).
        reuse_floor / reuse_span: reuse signal = clip((reuse fraction - floor) / span, 0, 1).
        k / knn_threshold: Chen et al. 2019: mean distance to the ``k`` nearest past queries; a query
            below ``knn_threshold`` (calibrated: a low benign percentile) is a hit.
        knn_hits: hits in ``window`` that make the k-NN signal 1.
        prada_min / prada_max / prada_delta: Juuti et al. 2019: Shapiro-Wilk W over the last ``prada_max``
            minimum distances once ``prada_min`` exist; signal 1 when W < ``prada_delta`` (calibrated),
            falling linearly to 0 at ``prada_delta + prada_margin``.
        rate_min_queries / rate_floor / rate_span: sustained rate over the recent queries as a fraction of
            the tier's rate: signal = clip((ratio - floor) / span, 0, 1) once ``rate_min_queries`` are seen.
        unlimited_rate: the reference rate (requests/s) for tiers without a rate limit.
        link_shared: distinct shared sources (near-duplicates across two keys) that link the keys.
        region_shared: queries of one key that share a verified region (overlapping pixels of one photo,
            :mod:`defenses.monitor.regions`) with queries of another key, that link the two keys; 0 = off.
            Two by default: at a busy service a chance shared region in a customer's first ten queries
            happens to about one customer in ten, two with one other client to under one in a hundred
            (docs/monitor.md, "Chance links at a busy service").
        region_capacity: recent queries (of all clients) whose region fingerprints are searched.
        min_queries: no image signal before this many admitted queries.
        rescan_on_link: when two keys become linked, score the last ``window`` queries of each again
            against the pooled history (:func:`~defenses.monitor.scoring.rescan`), instead of only the
            queries that arrive after the link.
    """

    history: int = Field(128, ge=8, le=4096)
    window: int = Field(32, ge=4, le=1024)
    dup_distance: float = Field(0.12, gt=0.0, le=2.0)
    reuse_floor: float = Field(0.2, ge=0.0, le=1.0)
    reuse_span: float = Field(0.25, gt=0.0, le=1.0)
    k: int = Field(4, ge=1, le=64)
    knn_threshold: float = Field(0.356, gt=0.0, le=2.0)
    knn_hits: int = Field(4, ge=1)
    prada_min: int = Field(20, ge=8)
    prada_max: int = Field(100, ge=8)
    prada_delta: float = Field(0.80, gt=0.0, lt=1.0)
    prada_margin: float = Field(0.05, gt=0.0, lt=1.0)
    rate_min_queries: int = Field(20, ge=2)
    rate_floor: float = Field(0.6, ge=0.0)
    rate_span: float = Field(0.35, gt=0.0)
    unlimited_rate: float = Field(20.0, gt=0.0)
    link_shared: int = Field(3, ge=1)
    region_shared: int = Field(2, ge=0)
    region_capacity: int = Field(512, ge=8, le=65536)
    min_queries: int = Field(8, ge=1)
    rescan_on_link: bool = True

    @model_validator(mode="after")
    def _reachable(self) -> SignalParams:
        """Refuse thresholds that silently switch a signal off: the k-NN signal counts hits over the last
        ``window`` queries, PRADA needs ``prada_min`` distances out of at most ``prada_max``, and the k-NN
        distance needs ``k`` past queries out of at most ``history``."""
        if self.knn_hits > self.window:
            raise ValueError(f"knn_hits ({self.knn_hits}) > window ({self.window}): the k-NN signal could never "
                             "reach 1; lower knn_hits or raise window")
        if self.prada_min > self.prada_max:
            raise ValueError(f"prada_min ({self.prada_min}) > prada_max ({self.prada_max}): PRADA would never run")
        if self.k >= self.history:
            raise ValueError(f"k ({self.k}) must be below history ({self.history}), the past queries it is "
                             "measured against")
        return self


class SignalWeights(_Frozen):
    """Weights of the noisy-OR ``risk = 1 - prod(1 - w_i * s_i)``; a weight below ``flag_risk`` means that
    signal alone never flags a client."""

    rate: float = Field(0.35, ge=0.0, le=1.0)
    reuse: float = Field(0.9, ge=0.0, le=1.0)
    knn: float = Field(0.9, ge=0.0, le=1.0)
    prada: float = Field(0.6, ge=0.0, le=1.0)
    link: float = Field(0.9, ge=0.0, le=1.0)
    region: float = Field(0.45, ge=0.0, le=1.0)


class EscalationStep(_Frozen):
    """At ``risk >= risk`` the client gets ``level`` (levels are defined by the defense policy)."""

    risk: float = Field(ge=0.0, le=1.0)
    level: int = Field(ge=0)


def default_steps() -> list[EscalationStep]:
    return [EscalationStep(risk=0.5, level=1), EscalationStep(risk=0.8, level=2), EscalationStep(risk=0.95, level=3)]


class MonitorConfig(_Frozen):
    """``[monitor]`` in the victim settings.

    Attributes:
        enabled: run the monitor (it runs only when the query log is on, too).
        flag_risk: a client is flagged once its risk reaches this (the flag stays).
        fail_safe_level: the level requests get when the level store cannot be read (Redis down) for a
            client with no cached level.
        escalation: per tier name, risk steps -> level; ``default`` for tiers not listed. Levels only go up.
        batch: log entries read per round; block_ms: how long one read waits for new entries.
        lease_s: the consumer lease (one worker scores at a time; another takes over within ``lease_s``).
    """

    enabled: bool = True
    flag_risk: float = Field(0.5, gt=0.0, le=1.0)
    fail_safe_level: int = Field(0, ge=0)
    signals: SignalParams = Field(default_factory=SignalParams)
    weights: SignalWeights = Field(default_factory=SignalWeights)
    escalation: dict[str, list[EscalationStep]] = Field(default_factory=lambda: {"default": default_steps()})
    batch: int = Field(256, ge=1, le=10_000)
    block_ms: int = Field(200, ge=1, le=10_000)
    lease_s: float = Field(5.0, gt=0.5, le=300.0)

    @field_validator("escalation")
    @classmethod
    def _steps(cls, v: dict[str, list[EscalationStep]]) -> dict[str, list[EscalationStep]]:
        for tier, steps in v.items():
            risks = [s.risk for s in steps]
            if risks != sorted(risks):
                raise ValueError(f"escalation.{tier}: steps must be in increasing risk order")
        return v

    @model_validator(mode="after")
    def _default(self) -> MonitorConfig:
        if "default" not in self.escalation:
            raise ValueError("escalation needs a 'default' entry (used for tiers not listed)")
        return self

    def level_for(self, tier: str | None, risk: float) -> int:
        """The escalation level of ``risk`` under ``tier``'s steps (0 below the first step)."""
        steps = self.escalation.get(tier or "default", self.escalation["default"])
        level = 0
        for s in steps:
            if risk >= s.risk:
                level = max(level, s.level)
        return level
