"""The registry of campaign cell kinds (see :mod:`evaluation.campaign.kinds.base` for the contract).

Add a kind by writing a :class:`~evaluation.campaign.kinds.base.CellKind` subclass whose ``Params`` has
a ``kind: Literal["NAME"]`` field, and registering an instance here.
"""

from __future__ import annotations

from evaluation.campaign.kinds.base import CellKind
from evaluation.campaign.kinds.extraction import ExtractionKind
from evaluation.campaign.kinds.membership import MembershipKind
from evaluation.campaign.kinds.monitor import MonitorKind
from evaluation.campaign.kinds.watermark import WatermarkKind

CELL_KINDS: dict[str, CellKind] = {
    k.name: k for k in (ExtractionKind(), MembershipKind(), MonitorKind(), WatermarkKind())
}


def owner_of(key: str) -> list[str]:
    """The kinds whose entries accept ``key`` (for "this key belongs to another kind" errors)."""
    return [name for name, k in CELL_KINDS.items() if key in k.Params.model_fields and key != "kind"]


__all__ = ["CELL_KINDS", "CellKind", "owner_of"]
