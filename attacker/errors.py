"""Errors the attacker raises. All are :class:`translators.errors.HeistError`, so the CLI prints one line.

Policy (documented in ``docs/attacker.md``):

- :class:`VictimUnreachableError`: the URL cannot be reached (connection refused, DNS, TLS) after the
  configured retries. The run stops; pairs written so far are kept and a re-run resumes.
- :class:`UnauthorizedError`: the victim answered 401 for a key that never worked. The run stops.
- :class:`QuotaExhaustedError`: the key's quota ran out in a command that cannot keep a partial result
  (``heist attack mia``; a harvest stops cleanly instead).
- :class:`UnknownModelError`: the model is not in ``GET /v1/models`` or the victim answered 404.
- :class:`VictimFailingError`: a storm of 5xx answers / timeouts exhausted the retries. The run stops.
- :class:`InputsRefusedError`: the victim refused too many inputs (4xx image errors); the strategy makes
  inputs this victim does not accept.
- :class:`PairStoreError` / :class:`RunFolderError`: the run folder is locked, belongs to a different
  harvest, or is unusable.
- :class:`TrainingError`: pairs unusable for training (none, wrong scale, too small for the surrogate).
"""

from __future__ import annotations

from translators.errors import HeistError


class AttackError(HeistError):
    """Base class of the attacker's user-facing errors."""

    code = "attack_error"


class VictimUnreachableError(AttackError):
    code = "unreachable"


class UnauthorizedError(AttackError):
    code = "unauthorized"


class QuotaExhaustedError(AttackError):
    """The key's quota ran out where the command cannot stop early and keep a partial result (``mia``)."""

    code = "quota_exhausted"


class UnknownModelError(AttackError):
    code = "unknown_model"


class VictimFailingError(AttackError):
    code = "victim_failing"


class VictimProtocolError(AttackError):
    """The victim answered something the HTTP contract does not allow (not an image, bad JSON)."""

    code = "protocol_error"


class InputsRefusedError(AttackError):
    code = "inputs_refused"


class PairStoreError(AttackError):
    code = "pair_store"


class RunFolderError(AttackError):
    code = "run_folder"


class TrainingError(AttackError):
    code = "training"


class ConfigError(AttackError):
    """Invalid options (unknown strategy, bad parameter values)."""

    code = "bad_config"
