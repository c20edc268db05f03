"""Cell kind ``membership``: membership inference through the API against a memorising victim.

One cell = one served model (the victim, or a model-level defense of it: AKD, DMP, DP-SGD) x one
output-defense label (its tier: e.g. Gaussian noise). :func:`run_membership_cell` is the whole cell as
a plain function of a :class:`MembershipSpec` and :class:`CellPaths`: it queries every member and
non-member once with the cell's own API key (limits count), scores them (:mod:`attacker.mia`), and
measures utility on the same answers (PSNR/SSIM against ground truth, the member/non-member gap, and
NKID on ``[evaluation] feature_network``: by default InceptionV3 when its weights are found, else the
offline ``vgg16-random``; every NKID names its network). A failed cell reruns from the start (it costs ``2 n`` queries).
"""

from __future__ import annotations

import functools
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator

from evaluation.campaign.kinds.base import (
    CellKind,
    CellPaths,
    CellPlan,
    CellTask,
    RunContext,
    StrictParams,
    campaign_settings,
    check_images,
    defense_settings,
    nkid_feature_network,
    no_repeats,
    victim_model_settings,
)

if TYPE_CHECKING:
    from evaluation.campaign.config import CampaignConfig
    from evaluation.results import MembershipCell

_LABEL = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


class ModelDefenseSpec(StrictParams):
    """A model-level defense: a new checkpoint trained from the victim (served as ``VICTIM-LABEL``).

    ``method``: ``akd`` (student + PatchGAN, lambda = 100 L1 to the teacher, on a proxy set), ``dmp``
    (the same without the discriminator), ``dpsgd`` (the victim retrained on its private set with
    DP-SGD, ``noise_multiplier`` sigma and per-sample clipping ``max_grad_norm``). ``steps``: training
    steps (default: the victim's). ``proxy_pairs`` (akd/dmp only): proxy inputs, default 4 x the private
    set (``bench/akd_sweep.py`` measures what it does to privacy and utility).
    """

    label: str = Field(pattern=_LABEL)
    method: Literal["akd", "dmp", "dpsgd"]
    steps: int | None = Field(None, ge=1)
    noise_multiplier: float | None = Field(None, gt=0)
    max_grad_norm: float = Field(1.0, gt=0)
    proxy_pairs: int | None = Field(None, ge=1)


class MembershipParams(StrictParams):
    """A ``[[cells]]`` entry of kind ``membership``.

    ``victim``: a ``[[victims]]`` name whose zoo recipe records a membership split (e.g. ``mia-edges``).
    ``defenses``: output-defense labels (``[[defenses]]``) to attack through. ``reference_steps``:
    training steps of the attacker's reference model (difficulty calibration) on public pairs from
    ``reference_images``; 0 = no calibrated score. ``heldout_pairs``: utility is also measured on this
    many edge -> photo pairs of ``heldout_images`` (never seen by the victim or a student), queried
    through the same API: PSNR, SSIM and NKID on a set large enough for NKID to resolve a few points
    (the 24 tiny non-members cannot: ``bench/akd_sweep.py``); 0 = off.
    """

    kind: Literal["membership"] = "membership"
    victim: str
    defenses: list[str] = Field(default_factory=lambda: ["none"], min_length=1)
    model_defenses: list[ModelDefenseSpec] = Field(default_factory=list)
    reference_steps: int = Field(300, ge=0)
    reference_images: str = "corpus:attacker"
    concurrency: int = Field(4, ge=1, le=64)
    heldout_pairs: int = Field(0, ge=0, le=10_000)
    heldout_images: str = "corpus:benchmark"

    @field_validator("defenses")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        return no_repeats(v, "defenses")

    @field_validator("reference_images")
    @classmethod
    def _images(cls, v: str) -> str:
        check_images(v)
        return v

    @field_validator("heldout_images")
    @classmethod
    def _public(cls, v: str) -> str:
        from defenses.model_level.common import ModelDefenseError, refuse_private_images

        try:
            refuse_private_images(v, "heldout_images", "corpus:benchmark")
        except ModelDefenseError as exc:
            raise ValueError(str(exc)) from None
        return v

    def check(self, cfg: CampaignConfig) -> None:
        from translators.zoo import get_recipe
        from translators.zoo.membership import MembershipRecipe

        victim = next((v for v in cfg.victims if v.name == self.victim), None)
        if victim is None:
            raise ValueError(f"membership cell: no [[victims]] entry named {self.victim!r}")
        if not isinstance(get_recipe(victim.recipe or victim.name), MembershipRecipe):
            raise ValueError(f"membership cell: victim {self.victim!r} is not a membership recipe (mia-edges)")
        labels = {d.label for d in cfg.defenses}
        unknown = [d for d in self.defenses if d not in labels]
        if unknown:
            raise ValueError(f"membership cell: unknown defense labels {unknown} (known: {sorted(labels)})")
        md = [m.label for m in self.model_defenses]
        if len(set(md)) != len(md) or "none" in md:
            raise ValueError("model_defenses labels must be unique and not 'none'")
        for m in self.model_defenses:
            if m.method == "dpsgd" and m.noise_multiplier is None:
                raise ValueError(f"model defense {m.label!r}: dpsgd needs noise_multiplier")
            if m.method == "dpsgd" and m.proxy_pairs is not None:
                raise ValueError(f"model defense {m.label!r}: proxy_pairs is for akd/dmp students (dpsgd retrains "
                                 "on the private set)")


def model_defense_settings(cfg: CampaignConfig, victim: str, spec: ModelDefenseSpec) -> dict[str, Any]:
    """What decides a model-level defense's checkpoint: the victim model, the spec, seed and device."""
    return {"what": "model_defense", "victim": victim_model_settings(cfg, victim), **spec.model_dump(mode="json"),
            "seed": cfg.campaign.seed, "device": cfg.campaign.device}


def reference_settings(cfg: CampaignConfig, params: MembershipParams) -> dict[str, Any]:
    """What decides the attacker's reference model: the victim model (its crop side), steps, images, seed."""
    return {"what": "reference", "victim": victim_model_settings(cfg, params.victim), "steps": params.reference_steps,
            "images": params.reference_images, "seed": cfg.campaign.seed}


def _recorded_model_defense(cfg: CampaignConfig, victim: str, label: str) -> dict[str, Any] | None:
    """The settings of model defense ``label`` of ``victim`` in (a previous run's) ``cfg``, None if it has none."""
    for e in cfg.entries():
        for m in getattr(e, "model_defenses", []) if e.kind == "membership" and e.victim == victim else []:
            if m.label == label:
                return model_defense_settings(cfg, victim, m)
    return None


def _recorded_reference(cfg: CampaignConfig, victim: str) -> dict[str, Any] | None:
    """The reference-model settings of ``victim``'s membership entry in (a previous run's) ``cfg``."""
    for e in cfg.entries():
        if e.kind == "membership" and e.victim == victim and e.reference_steps:
            return reference_settings(cfg, e)
    return None


def mia_cell_id(victim: str, model_defense: str, defense: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", f"mia.{victim}.{model_defense}.{defense}")


@dataclass(frozen=True)
class MembershipSpec:
    """One membership cell as plain data (picklable for a remote executor)."""

    id: str
    url: str
    api_key: str
    victim: str
    model: str
    model_defense: str
    defense: str
    members_dir: str
    non_members_dir: str
    reference: str | None
    concurrency: int
    seed: int
    feature_weights: str | None = None
    feature_network: str | None = None
    heldout_pairs: int = 0
    heldout_images: str = "corpus:benchmark"


def run_membership_cell(spec: MembershipSpec, paths: CellPaths) -> MembershipCell:
    """Attack one served model and measure its utility; writes ``paths.run/scores.json``."""
    from attacker.mia import Candidate, load_candidates, public_pairs, query_outputs, run_mia, write_scores
    from evaluation.privacy import membership_scores, membership_utility
    from evaluation.results import MembershipCell
    from translators.checkpoint import load_model

    t0 = time.perf_counter()
    members = load_candidates(spec.members_dir, "members")
    non_members = load_candidates(spec.non_members_dir, "non-members")
    reference = load_model(spec.reference).module if spec.reference else None
    res = run_mia(spec.url, spec.api_key, spec.model, members, non_members, reference=reference,
                  concurrency=spec.concurrency)
    heldout: list[Candidate] = []
    outputs, queries = dict(res.outputs), res.queries
    if spec.heldout_pairs:
        side = int(members[0].x.shape[-1])
        heldout = [Candidate(f"heldout-{c.name}", c.x, c.y)
                   for c in public_pairs(spec.heldout_images, side, spec.heldout_pairs, seed=spec.seed + 104729)]
        held_out, sent = query_outputs(spec.url, spec.api_key, spec.model, heldout, spec.concurrency)
        outputs.update(held_out)
        queries += sent
    write_scores(res, paths.run)
    network = nkid_feature_network(spec.feature_network, spec.feature_weights)
    cell = MembershipCell(id=spec.id, victim=spec.victim, model=spec.model, model_defense=spec.model_defense,
                          defense=spec.defense, seed=spec.seed, status="done", run_dir=str(paths.run),
                          queries_used=queries,
                          headline="calibrated" if "calibrated" in res.scores else "l2")
    cell.scores = membership_scores(res.names, res.labels, res.scores)
    cell.utility = membership_utility(members, non_members, outputs, network, seed=spec.seed, heldout=heldout)
    cell.wall_times = {"attack": round(res.seconds, 2), "total": round(time.perf_counter() - t0, 2)}
    return cell


class MembershipKind(CellKind):
    """Membership inference cells; see the module docstring."""

    name = "membership"
    Params = MembershipParams

    @staticmethod
    def _variants(params: MembershipParams) -> list[str]:
        return ["none", *(m.label for m in params.model_defenses)]

    def plan(self, cfg: CampaignConfig, params: MembershipParams) -> list[CellPlan]:
        return [CellPlan(mia_cell_id(params.victim, md, d), d) for md in self._variants(params)
                for d in params.defenses]

    def _coords(self, params: MembershipParams, plan: CellPlan) -> tuple[str, str]:
        for md in self._variants(params):
            if mia_cell_id(params.victim, md, plan.defense) == plan.id:
                return md, (params.victim if md == "none" else f"{params.victim}-{md}")
        raise KeyError(plan.id)

    def models(self, cfg: CampaignConfig, params: MembershipParams, out: Path,
               victims: dict[str, str]) -> dict[str, str]:
        """Train each model-level defense from the victim (cached under ``OUT/models``, rebuilt when its settings
        changed: :func:`evaluation.campaign.fingerprint.reusable_artefact`)."""
        from defenses.model_level import build_model_defense
        from evaluation.campaign.fingerprint import previous_run, reusable_artefact

        served = {}
        prev = previous_run(out)
        for m in params.model_defenses:
            name = f"{params.victim}-{m.label}"
            path = out / "models" / f"{name}.safetensors"
            recorded = functools.partial(_recorded_model_defense, victim=params.victim, label=m.label)
            reusable_artefact(path, model_defense_settings(cfg, params.victim, m),
                              functools.partial(prev.recorded, recorded, path), f"model defense {m.label!r}",
                              also=(path.with_suffix(".json"),))
            served[name] = str(build_model_defense(
                m.method, victims[params.victim], path, name=name,
                steps=m.steps, noise_multiplier=m.noise_multiplier, max_grad_norm=m.max_grad_norm,
                proxy_pairs=m.proxy_pairs, seed=cfg.campaign.seed, device=cfg.campaign.device))
        return served

    def settings(self, cfg: CampaignConfig, params: MembershipParams, plan: CellPlan) -> dict[str, Any]:
        """The served model (the victim or its model-level defense), the output defense, the entry's attack and
        held-out settings, the reference model's, the NKID network; campaign-wide settings."""
        md, _ = self._coords(params, plan)
        spec = next((m for m in params.model_defenses if m.label == md), None)
        entry = params.model_dump(mode="json", exclude={"defenses", "model_defenses"})
        fw = cfg.evaluation.feature_weights
        return {"kind": self.name, **campaign_settings(cfg), "victim": victim_model_settings(cfg, params.victim),
                "model_defense": model_defense_settings(cfg, params.victim, spec) if spec else None,
                "defense": defense_settings(cfg, plan.defense), "entry": entry,
                "feature_network": cfg.evaluation.feature_network, "feature_weights": str(fw) if fw else None}

    def pending(self, cfg: CampaignConfig, params: MembershipParams, plan: CellPlan,
                paths: CellPaths) -> MembershipCell:
        from evaluation.results import MembershipCell

        md, model = self._coords(params, plan)
        return MembershipCell(id=plan.id, victim=params.victim, model=model, model_defense=md, defense=plan.defense,
                              seed=cfg.campaign.seed, status="running", run_dir=str(paths.run))

    def prepare(self, ctx: RunContext, params: MembershipParams) -> None:
        """The membership split from the victim's card; the attacker's reference model (cached)."""
        from attacker.mia import train_reference
        from evaluation.campaign.fingerprint import previous_run, reusable_artefact
        from translators.checkpoint import read_card

        card = read_card(ctx.served[params.victim])
        split = getattr(card, "membership", None) or (card.model_extra or {}).get("membership")
        if not split:
            raise ValueError(f"victim {params.victim!r} records no membership split in its model card")
        ref = None
        if params.reference_steps:
            ref_path = ctx.out / "membership" / f"reference-{params.victim}.safetensors"
            prev = previous_run(ctx.out)
            recorded = functools.partial(_recorded_reference, victim=params.victim)
            if not reusable_artefact(ref_path, reference_settings(ctx.cfg, params),
                                     functools.partial(prev.recorded, recorded, ref_path),
                                     "the attacker's reference model", also=(ref_path.with_suffix(".json"),)):
                ctx.say(f"training the attacker's reference model ({params.reference_steps} steps, public data)")
                with ctx.phase("reference"):
                    train_reference(params.reference_images, side=int(split["members"]["side"]),
                                    steps=params.reference_steps, out=ref_path, seed=ctx.cfg.campaign.seed)
            ref = str(ref_path)
        ctx.shared[f"membership:{params.victim}"] = {"split": split, "reference": ref}

    def task(self, ctx: RunContext, params: MembershipParams, plan: CellPlan, paths: CellPaths) -> CellTask:
        state = ctx.shared[f"membership:{params.victim}"]
        md, model = self._coords(params, plan)
        fw = ctx.cfg.evaluation.feature_weights
        spec = MembershipSpec(
            id=plan.id, url=ctx.url(), api_key=ctx.attack_key(plan.id, plan.defense), victim=params.victim,
            model=model, model_defense=md, defense=plan.defense, members_dir=state["split"]["members"]["dir"],
            non_members_dir=state["split"]["non_members"]["dir"], reference=state["reference"],
            concurrency=params.concurrency, seed=ctx.cfg.campaign.seed, feature_weights=str(fw) if fw else None,
            feature_network=ctx.cfg.evaluation.feature_network, heldout_pairs=params.heldout_pairs,
            heldout_images=params.heldout_images)
        return CellTask(run_membership_cell, spec, paths, self.pending(ctx.cfg, params, plan, paths),
                        note=f"{plan.id}: membership inference on {model} through tier {plan.defense}")
