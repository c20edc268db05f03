"""The output-defense base class and the per-request context every defense receives.

Contract (docs/CONTRACTS.md, "Output defenses"): ``apply(outputs, inputs, ctx) -> outputs`` takes
``outputs`` ``(N, 3, sH, sW)`` and ``inputs`` ``(N, 3, H, W)``, float in ``[0, 1]`` on the model's device,
and returns a tensor of the same shape, dtype and device with values in ``[0, 1]``. ``N`` is the number
of images of one request (1 for the HTTP API). :meth:`OutputDefense.apply_batch` receives several
requests of one dynamic batch at once (one context each); its default loops over :meth:`apply`, and a
defense that gains from batching (FMD's PGD steps) overrides it.

Extension points kept for the defenses that come next:

- watermarking: ``ctx.client_id`` is the client-specific payload; :meth:`DefenseContext.derived_rng`
  gives stable, secret-keyed randomness (e.g. a per-client key pattern).
- FMD: set ``requires_grad = True``; the pipeline then runs ``apply`` under ``torch.enable_grad()`` (the
  model's forward is run under ``no_grad`` instead of ``inference_mode`` so outputs can enter autograd),
  and :meth:`OutputDefense.setup` is called once per device at start-up to load a feature network.
- monitor-driven escalation: ``ctx.suspicion`` (0 = nothing suspicious, 1 = certain) is filled in by the
  service from the query monitor; a defense may scale its strength with it, and the service may pick a
  stronger pipeline for a flagged client.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict


class DefenseParams(BaseModel):
    """Base of every defense's parameter model: unknown keys are an error, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def request_seed(secret: int, *parts: str) -> int:
    """A 63-bit seed from a server secret and strings (request id, client id, input hash): SHA-256 based."""
    h = hashlib.sha256(str(secret).encode())
    for p in parts:
        h.update(b"\x1f")
        h.update(p.encode())
    return int.from_bytes(h.digest()[:8], "big") & ((1 << 63) - 1)


def request_rng(seed: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with ``seed`` (draw on CPU, then move to the model's device)."""
    g = torch.Generator(device="cpu")
    g.manual_seed(seed)
    return g


@dataclass(frozen=True)
class DefenseContext:
    """What a defense may know about the request whose outputs it post-processes.

    Attributes:
        client_id: the API client's name (the key's ``name``); watermark payloads derive from it.
        request_id: the ``X-Request-Id`` of the request.
        model: served model name.
        tier: the client's tier.
        rng: CPU generator seeded from (server secret, request id): different for every request.
        input_sha256: hex SHA-256 of the request's image bytes ("" when unknown).
        suspicion: query-monitor score in [0, 1]; 0 when no monitor runs.
        secret: server-side secret for :meth:`derived_rng`; never leaves the server.
    """

    client_id: str
    request_id: str
    model: str
    tier: str
    rng: torch.Generator
    input_sha256: str = ""
    suspicion: float = 0.0
    secret: int = field(default=0, repr=False)

    def derived_rng(self, *parts: str) -> torch.Generator:
        """A generator keyed by the server secret and ``parts``: the same parts give the same stream."""
        return request_rng(request_seed(self.secret, *parts))


class OutputDefense(ABC):
    """Base class: subclasses set ``name``, ``Params`` and implement :meth:`apply`.

    Register with ``@DEFENSE_REGISTRY.register("name")``; build with ``build_defense({"name": ..., **params})``.
    """

    name: ClassVar[str] = "defense"
    Params: ClassVar[type[DefenseParams]] = DefenseParams
    #: True when ``apply`` needs autograd (FMD). The pipeline then enables gradients around it.
    requires_grad: ClassVar[bool] = False

    def __init__(self, params: DefenseParams | None = None, **kwargs: Any) -> None:
        if params is not None and kwargs:
            raise TypeError("pass either a Params object or keyword parameters, not both")
        self.params = params if params is not None else self.Params(**kwargs)

    def setup(self, device: torch.device) -> None:  # noqa: B027 - optional hook, default does nothing
        """Called once per device before serving (load feature networks, move buffers). Default: nothing."""

    @abstractmethod
    def apply(self, outputs: torch.Tensor, inputs: torch.Tensor, ctx: DefenseContext) -> torch.Tensor:
        """``outputs (N, 3, sH, sW)``, ``inputs (N, 3, H, W)`` in [0, 1] -> defended outputs, same shape/dtype."""

    def apply_batch(
        self, outputs: torch.Tensor, inputs: torch.Tensor, ctxs: Sequence[DefenseContext]
    ) -> torch.Tensor:
        """Several requests at once (row ``i`` belongs to ``ctxs[i]``). Default: :meth:`apply` per row."""
        if len(ctxs) != outputs.shape[0]:
            raise ValueError(f"{len(ctxs)} contexts for a batch of {outputs.shape[0]}")
        if len(ctxs) == 1:
            return self.apply(outputs, inputs, ctxs[0])
        rows = [self.apply(outputs[i : i + 1], inputs[i : i + 1], c) for i, c in enumerate(ctxs)]
        return torch.cat(rows, 0)

    def spec(self) -> dict[str, Any]:
        """The config dict that rebuilds this defense: ``{"name": ..., **params}``."""
        return {"name": self.name, **self.params.model_dump()}

    def describe(self) -> str:
        """Short human/log form, e.g. ``jpeg(quality=75)``."""
        args = ",".join(f"{k}={v}" for k, v in self.params.model_dump().items())
        return f"{self.name}({args})"

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.describe()}>"
