"""Membership-inference metrics: ROC AUC and TPR at a fixed low FPR, from scores and labels.

Scores are "higher = more likely a member"; labels are 1 for members, 0 for non-members. Ties are
handled as scikit-learn does (one ROC point per distinct threshold; AUC by the trapezoid rule, which
counts a tied member/non-member pair as 1/2). ``TPR@FPR`` is the largest TPR among ROC points whose FPR
does not exceed the level (Carlini et al. 2022, "Membership inference attacks from first principles";
the akd-membership-privacy paper reports AUCROC only).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from evaluation.errors import EvaluationError

if TYPE_CHECKING:
    from evaluation.results import MembershipScores, MembershipUtility


def roc_curve(scores: Sequence[float], labels: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(fpr, tpr, thresholds)``: one point per distinct score (descending), starting at ``(0, 0)``."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    if s.shape != y.shape or s.ndim != 1:
        raise EvaluationError("scores and labels must be 1-D and of equal length")
    pos, neg = int((y == 1).sum()), int((y == 0).sum())
    if pos == 0 or neg == 0 or pos + neg != len(y):
        raise EvaluationError("ROC needs labels in {0, 1} with at least one member and one non-member")
    if not np.all(np.isfinite(s)):
        raise EvaluationError("scores must be finite")
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]  # index of the last candidate of each distinct score
    tps = np.cumsum(y)[last]
    fps = (last + 1) - tps
    tpr = np.r_[0.0, tps / pos]
    fpr = np.r_[0.0, fps / neg]
    thresholds = np.r_[np.inf, s[last]]
    return fpr, tpr, thresholds


def roc_auc(scores: Sequence[float], labels: Sequence[int]) -> float:
    """Area under the ROC curve (trapezoid rule); 0.5 = guessing, 1 = perfect separation."""
    fpr, tpr, _ = roc_curve(scores, labels)
    return float(np.trapezoid(tpr, fpr))


def tpr_at_fpr(scores: Sequence[float], labels: Sequence[int], fpr_level: float) -> float:
    """The largest TPR of a threshold whose FPR is at most ``fpr_level`` (0 when none is)."""
    if not 0 <= fpr_level <= 1:
        raise EvaluationError("fpr_level must be in [0, 1]")
    fpr, tpr, _ = roc_curve(scores, labels)
    ok = fpr <= fpr_level + 1e-12
    return float(tpr[ok].max()) if ok.any() else 0.0


def fpr_resolution_note(n_non_members: int, fpr_levels: Sequence[float] = (0.01, 0.001)) -> str | None:
    """A caveat when ``n_non_members`` cannot resolve an FPR level: the smallest FPR above 0 is ``1/n``, so
    TPR at a level below it is the TPR at zero false positives (a small sample's luck, not a rate); None when
    every level is resolved."""
    coarse = [lvl for lvl in fpr_levels if lvl * n_non_members < 1]
    if not coarse or n_non_members < 1:
        return None
    levels = ", ".join(f"{lvl:g}" for lvl in coarse)
    return (f"with {n_non_members} non-members the smallest FPR above 0 is 1/{n_non_members} = "
            f"{1 / n_non_members:.3g}: TPR at FPR {levels} is the TPR with no false positive at all "
            f"(at least {int(np.ceil(1 / min(coarse)))} non-members resolve {min(coarse):g})")


def membership_scores(
    names: Sequence[str], labels: Sequence[int], scores: dict[str, list[float]],
    fpr_levels: Sequence[float] = (0.01, 0.001),
) -> dict[str, MembershipScores]:
    """One :class:`~evaluation.results.MembershipScores` per score name (AUC, TPR@FPR, ROC, per candidate)."""
    from evaluation.results import MembershipScores, RocCurve

    out = {}
    n_m = int(sum(labels))
    for name, values in scores.items():
        fpr, tpr, _ = roc_curve(values, labels)
        out[name] = MembershipScores(
            score=name, auc=roc_auc(values, labels),
            tpr_at_fpr={f"{lvl:g}": tpr_at_fpr(values, labels, lvl) for lvl in fpr_levels},
            n_members=n_m, n_non_members=len(labels) - n_m,
            roc=RocCurve(fpr=[float(v) for v in fpr], tpr=[float(v) for v in tpr]),
            per_candidate={n: float(v) for n, v in zip(names, values, strict=True)})
    return out


def membership_utility(
    members: Sequence[Any], non_members: Sequence[Any], outputs: dict[str, torch.Tensor],
    network: Any = None, seed: int = 0, heldout: Sequence[Any] = (),
) -> MembershipUtility:
    """Served outputs vs ground truth (PSNR dB / SSIM, data_range 1, RGB, no border crop) on members and
    non-members, and NKID with ``network`` (paper eq. 6: gap = NKID(train) - NKID(test)); each NKID records
    its network (:class:`~evaluation.features.FeatureNetworkInfo`). ``heldout``: more pairs of the task
    that no model trained on (their outputs in ``outputs`` too): the same measures on a larger test set.
    """
    from evaluation.metrics import psnr, ssim
    from evaluation.results import MembershipUtility

    def quality(cands: Sequence[Any]) -> tuple[float, float]:
        p = [float(psnr(outputs[c.name].clamp(0, 1), c.y, data_range=1.0)) for c in cands]
        s = [float(ssim(outputs[c.name].clamp(0, 1), c.y, data_range=1.0)) for c in cands]
        return float(np.mean(p)), float(np.mean(s))

    pm, sm = quality(members)
    pn, sn = quality(non_members)
    u = MembershipUtility(psnr_members=pm, psnr_non_members=pn, ssim_members=sm, ssim_non_members=sn,
                          gap_psnr_db=pm - pn, heldout_pairs=len(heldout))
    if heldout:
        u.psnr_heldout, u.ssim_heldout = quality(heldout)
    if network is None:
        u.notes.append("NKID not computed: no feature network ([evaluation] feature_network = \"none\")")
        return u
    if not network.info.comparable_with_papers:
        u.notes.append(f"NKID on {network.info.label}: relative to this network's KID of black images; not "
                       "comparable in absolute value with InceptionV3 NKID (docs/privacy.md)")
    from evaluation.fid import compute_nkid

    size = min(len(members), len(non_members))
    kw = {"subsets": 10, "subset_size": max(2, size // 2), "seed": seed}
    u.nkid_members = compute_nkid(network, [outputs[c.name] for c in members], [c.y for c in members], **kw)
    u.nkid_non_members = compute_nkid(network, [outputs[c.name] for c in non_members],
                                      [c.y for c in non_members], **kw)
    u.generalisation_gap_nkid = u.nkid_members.nkid_percent - u.nkid_non_members.nkid_percent
    if heldout:
        u.nkid_heldout = compute_nkid(network, [outputs[c.name] for c in heldout], [c.y for c in heldout],
                                      subsets=10, subset_size=max(2, len(heldout) // 2), seed=seed)
    return u
