"""Admin routes of the query monitor: every client's risk, and one client's risk with its signals.

Both need the admin key. The state is the monitor's shared state (Redis hash ``{prefix}monitor:clients``
when Redis is configured, so any worker answers the same), see :mod:`victim_service.monitor`.
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Security
from pydantic import BaseModel, Field

from victim_service.errors import ApiError, redis_unavailable
from victim_service.routes import (
    _ADMIN_RESPONSES,
    _CLIENT_RESPONSES,
    _ERR,
    _require_admin,
    api_key_scheme,
    bearer_scheme,
    check_client_name,
)

router = APIRouter(tags=["admin"])


class ClientRisk(BaseModel):
    """What the monitor thinks of one client (``docs/monitor.md`` defines the signals)."""

    client: str
    tier: str | None = None
    risk: float = Field(description="noisy-OR of the weighted signals, in [0, 1]")
    flagged: bool = Field(description="risk reached flag_risk at some point")
    level: int = Field(description="escalation level the monitor set (the level store may hold an admin's)")
    level_in_force: int | None = Field(None, description="the level store's level for this client, the one that "
                                       "chooses its defenses (an admin's or the monitor's, whichever was set "
                                       "last; clamped per model and tier when served); None when never set")
    queries: int = Field(description="query-log entries of this client seen so far, refused ones included")
    admitted: int = 0
    resends: int = Field(0, description="byte-identical resends (retries), not scored as new inputs")
    flagged_at_query: int | None = Field(None, description="value of `queries` when first flagged")
    signals: dict[str, float] = Field(default_factory=dict, description="signal -> value in [0, 1] "
                                      "(prada_w is the raw Shapiro-Wilk statistic)")
    linked: list[str] = Field(default_factory=list,
                              description="keys the monitor links to this one (shared sources or regions)")


class MonitorStatus(BaseModel):
    enabled: bool
    clients: list[ClientRisk]


def _monitor(request: Request):  # type: ignore[no-untyped-def]
    svc = _require_admin(request)
    if svc.monitor is None:
        raise ApiError(404, "monitor_disabled", "the query monitor is off (heist serve --no-monitor, "
                       "monitor.enabled = false in the settings, or no query log)")
    return svc.monitor


async def _levels(request: Request, client: str | None = None) -> dict[str, int]:
    """The level store's levels (of every client, or of ``client``); 503 when it cannot be read."""
    store = _require_admin(request).levels
    with redis_unavailable("the level store"):
        if client is not None:
            rec = await store.record(client)
            return {client: rec.level} if rec is not None else {}
        return {name: rec.level for name, rec in (await store.all()).items()}


def _risk(summary: dict[str, object], levels: dict[str, int]) -> ClientRisk:
    return ClientRisk.model_validate({**summary, "level_in_force": levels.get(str(summary["client"]))})


@router.get("/v1/admin/clients", summary="Every client's risk", response_model=MonitorStatus,
            responses={**_ADMIN_RESPONSES, 404: {**_ERR, "description": "monitor_disabled"}},
            dependencies=[Security(api_key_scheme), Security(bearer_scheme)])
async def admin_clients(request: Request) -> MonitorStatus:
    """All clients the monitor has seen, highest risk first."""
    mon = _monitor(request)
    states = await mon.states()
    levels = await _levels(request)
    rows = [_risk(s.summary(mon.config.signals), levels) for s in states.values()]
    rows.sort(key=lambda c: (-c.risk, c.client))
    return MonitorStatus(enabled=True, clients=rows)


@router.get("/v1/admin/clients/{client}/risk", summary="One client's risk and signals", response_model=ClientRisk,
            responses={**_CLIENT_RESPONSES,
                       404: {**_ERR, "description": "unknown_client or monitor_disabled"}},
            dependencies=[Security(api_key_scheme), Security(bearer_scheme)])
async def admin_client_risk(request: Request, client: str) -> ClientRisk:
    """The monitor's view of one client: 400 ``bad_client`` for a name no key can have (as the level routes),
    404 ``unknown_client`` for a name the monitor has seen no query from."""
    mon = _monitor(request)
    check_client_name(client)
    s = await mon.state(client)
    if s is None:
        raise ApiError(404, "unknown_client", f"the monitor has seen no query from client {client!r}")
    return _risk(s.summary(mon.config.signals), await _levels(request, client))
