"""Membership-inference metrics against scikit-learn on fixed scores (ties included)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score
from sklearn.metrics import roc_curve as sk_roc_curve

from evaluation.errors import EvaluationError
from evaluation.privacy import fpr_resolution_note, membership_scores, roc_auc, roc_curve, tpr_at_fpr


def _fixed(n: int = 400, ties: bool = False) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    labels = np.r_[np.ones(n // 2, int), np.zeros(n // 2, int)]
    scores = rng.normal(size=n) + 1.2 * labels
    if ties:
        scores = np.round(scores, 1)
    return scores, labels


def _sk_tpr_at(scores: np.ndarray, labels: np.ndarray, level: float) -> float:
    fpr, tpr, _ = sk_roc_curve(labels, scores, drop_intermediate=False)
    return float(tpr[fpr <= level].max())


@pytest.mark.parametrize("ties", [False, True])
def test_auc_and_roc_match_sklearn(ties: bool) -> None:
    s, y = _fixed(ties=ties)
    assert roc_auc(s, y) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    fpr, tpr, _ = roc_curve(s, y)
    sk_fpr, sk_tpr, _ = sk_roc_curve(y, s, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr)
    np.testing.assert_allclose(tpr, sk_tpr)


@pytest.mark.parametrize("level", [0.01, 0.001, 0.1])
@pytest.mark.parametrize("ties", [False, True])
def test_tpr_at_fpr_matches_sklearn_curve(level: float, ties: bool) -> None:
    s, y = _fixed(n=4000, ties=ties)
    assert tpr_at_fpr(s, y, level) == pytest.approx(_sk_tpr_at(s, y, level))


def test_perfect_guessing_and_inverted_scores() -> None:
    y = [1, 1, 0, 0]
    assert roc_auc([4, 3, 2, 1], y) == 1.0
    assert tpr_at_fpr([4, 3, 2, 1], y, 0.0) == 1.0
    assert roc_auc([1, 2, 3, 4], y) == 0.0
    assert roc_auc([1, 1, 1, 1], y) == 0.5


def test_bad_inputs_are_errors() -> None:
    with pytest.raises(EvaluationError):
        roc_auc([1.0, 2.0], [1, 1])
    with pytest.raises(EvaluationError):
        roc_auc([1.0, float("nan")], [1, 0])
    with pytest.raises(EvaluationError):
        roc_auc([1.0, 2.0, 3.0], [1, 0])


def test_membership_scores_record_everything() -> None:
    s, y = _fixed(n=20)
    out = membership_scores([f"c{i}" for i in range(20)], y.tolist(), {"l2": s.tolist()})["l2"]
    assert out.auc == pytest.approx(roc_auc_score(y, s))
    assert set(out.tpr_at_fpr) == {"0.01", "0.001"}
    assert out.n_members == 10
    assert len(out.per_candidate) == 20


def test_fpr_levels_a_small_non_member_set_cannot_resolve_are_named() -> None:
    assert fpr_resolution_note(1000) is None
    note = fpr_resolution_note(200)
    assert note is not None
    assert "1/200 = 0.005: TPR at FPR 0.001 is the TPR with no false positive" in note
    assert "at least 1000 non-members resolve 0.001" in note
    assert "FPR 0.01, 0.001" in (fpr_resolution_note(8) or "")
    # what the note warns of: one lucky threshold gives TPR@0.1%FPR from 8 non-members
    scores = [0.9, 0.8, 0.7, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.05, 0.01]
    labels = [1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0]
    assert tpr_at_fpr(scores, labels, 0.001) == 1.0


def test_the_papers_row_is_shown_only_beside_the_cells_the_paper_ran() -> None:
    """Table II has plain DMP/AKD/DP-SGD models and the Gauss output defense on the regular model, never a
    model defense behind output noise: such a cell gets no paper numbers."""
    from evaluation.report.membership import PAPER_TABLE_II, row_key
    from evaluation.results import MembershipCell

    def cell(model_defense: str, defense: str) -> MembershipCell:
        return MembershipCell(id="c", victim="mia-edges", model="m", model_defense=model_defense, defense=defense)

    assert row_key(cell("none", "none")) == "none"
    assert row_key(cell("none", "gauss")) == "gauss"
    assert row_key(cell("dmp", "none")) == "dmp"
    assert row_key(cell("dmp", "gauss")) is None
    assert row_key(cell("akd", "gauss")) is None
    assert {row_key(cell(m, "none")) for m in ("dpsgd-lo", "dpsgd-hi", "akd")} <= set(PAPER_TABLE_II)
