"""The output-defense base class and the per-request context every defense receives.

Contract (docs/CONTRACTS.md, "Output defenses"): ``apply(outputs, inputs, ctx) -> outputs`` takes
``outputs`` ``(N, 3, sH, sW)`` and ``inputs`` ``(N, 3, H, W)``, float in ``[0, 1]`` on the model's device,
and returns a tensor of the same shape, dtype and device with values in ``[0, 1]``. ``N`` is the number
of images of one request (1 for the HTTP API). :meth:`OutputDefense.apply_batch` receives several
requests of one dynamic batch at once (one context each); its default loops over :meth:`apply`, and a
defense that gains from batching (FMD's PGD steps) overrides it.

Hooks a defense may use:

- keyed randomness: ``ctx.client_id`` identifies the client; :meth:`DefenseContext.derived_rng` gives
  stable, secret-keyed randomness (e.g. a per-client watermark payload).
- gradients: set ``requires_grad = True``; the pipeline then runs ``apply`` under ``torch.enable_grad()``
  (the model's forward is run under ``no_grad`` instead of ``inference_mode`` so outputs can enter
  autograd).
- the served model: set ``needs_model = True``; :meth:`OutputDefense.setup` then receives a
  :class:`ModelHandle` (module, device, card) once per loaded model, and the defense may run the model
  itself or put forward hooks on named layers (``handle.named_modules()``). A model served from an
  opaque format (TorchScript, ``torch.export``) has ``handle.hookable = False``; a defense that needs hooks
  raises :class:`ModelAccessError` from ``setup`` and the service refuses to start with that message.
- escalation: ``ctx.level`` is the client's escalation level (0 = the tier's pipeline) that selected this
  pipeline: the query monitor's decision reaches a defense only through it (levels carry their own,
  stronger pipelines; the risk score behind a level is on ``GET /v1/admin/clients/{name}/risk``).
"""

from __future__ import annotations

import hashlib
import typing
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator

from translators.errors import HeistError


class DefenseParams(BaseModel):
    """Base of every defense's parameter model: unknown keys are an error, values are immutable, and a number
    field refuses ``true``/``false`` (pydantic would read them as 1 and 0: ``quality = true`` would serve
    JPEG quality 1)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, v: Any, info: ValidationInfo) -> Any:
        if isinstance(v, bool) and info.field_name is not None:
            ann = cls.model_fields[info.field_name].annotation
            if ann is not bool and bool not in typing.get_args(ann):
                raise ValueError(f"expected {getattr(ann, '__name__', ann)}, got the boolean {str(v).lower()}")
        return v


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


class ModelAccessError(HeistError):
    """A model-aware defense cannot use the served model (opaque format, unknown layer name, ...)."""

    code = "bad_defense"


@dataclass(frozen=True)
class ModelHandle:
    """What a model-aware defense gets at set-up: the served model, read-only by convention.

    Attributes:
        name: served model name.
        module: the ``nn.Module`` (``eval()`` mode, on ``device``); inputs ``(N, 3, H, W)`` in [0, 1] ->
            outputs ``(N, 3, scale*H, scale*W)``.
        device: where the module lives.
        card: the model card as a dict (architecture, kwargs, task, scale, provenance).
        kind: ``"safetensors"`` (an eager module: hooks work), ``"torchscript"`` or ``"export"`` (opaque).
        task: ``sr``, ``denoise``, ``style`` or ``translation``.
        scale: output side / input side.
    """

    name: str
    module: torch.nn.Module
    device: torch.device
    card: dict[str, Any]
    kind: str
    task: str
    scale: int

    @property
    def hookable(self) -> bool:
        """True when forward hooks on named layers are supported (eager modules only)."""
        return self.kind == "safetensors" and not isinstance(self.module, torch.jit.ScriptModule)

    def named_modules(self) -> dict[str, torch.nn.Module]:
        """Layer name -> module (empty for opaque formats)."""
        return dict(self.module.named_modules()) if self.hookable else {}

    def require_hooks(self, defense: str) -> None:
        """Raise :class:`ModelAccessError` when this model does not allow forward hooks."""
        if not self.hookable:
            raise ModelAccessError(
                f"defense {defense!r} needs forward hooks on the layers of model {self.name!r}, which is served "
                f"from a {self.kind} file; serve it from a .safetensors checkpoint with a model card instead"
            )


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
        secret: server-side secret for :meth:`derived_rng`; never leaves the server.
        level: the client's escalation level that selected this request's pipeline (0 = tier default).
    """

    client_id: str
    request_id: str
    model: str
    tier: str
    rng: torch.Generator
    input_sha256: str = ""
    secret: int = field(default=0, repr=False)
    level: int = 0

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
    #: True when ``setup`` must receive the served model (:class:`ModelHandle`); the service refuses to
    #: build such a defense without one.
    needs_model: ClassVar[bool] = False

    def __init__(self, params: DefenseParams | None = None, **kwargs: Any) -> None:
        if params is not None and kwargs:
            raise TypeError("pass either a Params object or keyword parameters, not both")
        self.params = params if params is not None else self.Params(**kwargs)

    def setup(self, device: torch.device, model: ModelHandle | None = None) -> None:  # noqa: B027
        """Called once per (served model, pipeline) before serving: load feature networks, move buffers,
        register hooks. ``model`` is given whenever the service knows the served model, and always when
        ``needs_model`` is true. Raise :class:`ModelAccessError` (or a ``HeistError``) to refuse; the
        service then does not start. Default: nothing."""

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
