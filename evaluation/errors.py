"""Errors the evaluator raises for user mistakes (one-line messages; the CLI exits 2)."""

from __future__ import annotations

from translators.errors import HeistError


class EvaluationError(HeistError):
    """Bad evaluation input: mismatched images, values out of range, impossible settings."""

    code = "bad_evaluation_input"


class FeatureNetworkError(EvaluationError):
    """A feature network (InceptionV3 for FID/KID) whose weights are missing or unusable."""

    code = "feature_network_unavailable"


class ResultsError(EvaluationError):
    """A ``results.json`` that is missing, not JSON, or does not follow the schema."""

    code = "bad_results"
