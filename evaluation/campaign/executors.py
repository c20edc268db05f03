"""Who runs a campaign's cells: this process, one after another, or Ray tasks on a cluster.

An executor maps a picklable ``run_one(task) -> cell`` over one campaign entry's pending cells (the
runner passes :func:`evaluation.campaign.kinds.base.run_cell` and one
:class:`~evaluation.campaign.kinds.base.CellTask` per cell, of any kind: extraction, membership; each
task carries everything its cell needs: the victim's URL and keys, plain-data parameters, the cell's
folder) and calls ``on_done(cell)`` as each finishes, so progress streams whatever the order. Both
executors return the cells in the order of the tasks, so ``results.json`` and the report come out the same.

- :class:`SequentialExecutor` (the default): in this process, in plan order; ``before(task)`` runs just
  before each cell (the runner restarts a victim that died there).
- :class:`RayExecutor` (``heist campaign run FILE --executor ray [--address ADDR]``, extra ``ray``): one Ray
  task per cell with declared resources (``num_cpus``, ``num_gpus``: fractions pack several cells on a
  GPU); ``before`` runs for every task as it is submitted. A worker that dies (killed, out of memory) is
  retried by Ray (``max_retries``); a cell that returns ``failed`` is submitted again up to ``retries``
  times. When the victim listens on loopback (the campaign started it), every task is pinned to this
  node, so a cell's attacker and its victim talk over loopback; with a victim URL reachable from every
  node, tasks go wherever resources are free. The cells' folders must be on storage every node sees
  (one node: always true).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

from evaluation.results import AnyCell
from translators.errors import HeistError

log = logging.getLogger(__name__)
T = TypeVar("T")
RAY_EXTRA_HINT = "pip install 'i2i-heist[ray]'"


class ExecutorError(HeistError):
    """The executor cannot start (Ray missing, cluster unreachable); raised before any cell runs."""

    code = "executor_unavailable"


class CellExecutor(Protocol):
    name: str

    def run(
        self,
        run_one: Callable[[T], AnyCell],
        tasks: Sequence[T],
        *,
        on_done: Callable[[AnyCell], None],
        failed: Callable[[T, str], AnyCell],
        before: Callable[[T], T] | None = None,
        local_victim: bool = False,
    ) -> list[AnyCell]: ...

    def close(self) -> None: ...


class SequentialExecutor:
    """Cells one after another in this process (the embedded default). A cell that raises fails alone (its
    traceback logged, a ``failed`` record saved), as a crashed Ray task does; Ctrl-C still stops the run."""

    name = "sequential"

    def run(
        self,
        run_one: Callable[[T], AnyCell],
        tasks: Sequence[T],
        *,
        on_done: Callable[[AnyCell], None],
        failed: Callable[[T, str], AnyCell],
        before: Callable[[T], T] | None = None,
        local_victim: bool = False,
    ) -> list[AnyCell]:
        cells = []
        for task in tasks:
            if before is not None:
                task = before(task)
            try:
                cell = run_one(task)
            except Exception as exc:  # a bug in one cell fails that cell, as under Ray
                log.exception("cell %s crashed", getattr(task, "id", task))
                first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
                cell = failed(task, f"{type(exc).__name__}: {first}")
            on_done(cell)
            cells.append(cell)
        return cells

    def close(self) -> None:
        return None


def _in_ray_worker(run_one: Callable[[Any], AnyCell], task: Any, threads: int) -> AnyCell:
    """The body of every Ray task: torch threads matched to the CPUs the task declared, then the cell."""
    import torch

    torch.set_num_threads(max(1, threads))
    return run_one(task)


class RayExecutor:
    """Cells as Ray tasks. Connects in the constructor, so a missing extra or an unreachable cluster is one
    :class:`ExecutorError` before any cell runs.

    Args:
        address: a running cluster (``ray://HOST:10001`` or ``HOST:6379``; ``auto`` finds a local one);
            None starts a local Ray instance with ``num_cpus`` CPUs (all when None).
        cpus_per_cell / gpus_per_cell: the resources each cell declares (GPU fractions allowed).
        retries: how many times a cell that ended ``failed`` (or whose worker died past Ray's own
            ``max_retries``) is submitted again.
    """

    name = "ray"

    def __init__(self, address: str | None = None, *, cpus_per_cell: float = 1.0, gpus_per_cell: float = 0.0,
                 retries: int = 1, max_retries: int = 2, num_cpus: int | None = None) -> None:
        try:
            import ray
        except ImportError:
            raise ExecutorError(f"the Ray executor needs Ray, which is not installed: {RAY_EXTRA_HINT}") from None
        self.ray = ray
        self.cpus, self.gpus = cpus_per_cell, gpus_per_cell
        self.retries, self.max_retries = retries, max_retries
        self._started = False
        env = {"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in (os.getcwd(), os.environ.get("PYTHONPATH"))
                                                          if p)}}
        if address is not None and address != "auto":
            _check_reachable(address)  # Ray itself retries an unreachable address for minutes
        try:
            if not ray.is_initialized():
                if address is None:
                    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, runtime_env=env)
                else:
                    ray.init(address=address, log_to_driver=False, runtime_env=env)
                self._started = True
        except (ConnectionError, RuntimeError, ValueError, TimeoutError) as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ExecutorError(f"cannot reach the Ray cluster at {address}: {first} ({RAY_EXTRA_HINT} on every node; "
                                "start one with `ray start --head`)") from None
        total = ray.cluster_resources()
        if total.get("CPU", 0) < cpus_per_cell or total.get("GPU", 0) < gpus_per_cell:
            self.close()
            raise ExecutorError(f"the Ray cluster offers {total.get('CPU', 0):g} CPU / {total.get('GPU', 0):g} GPU; "
                                f"a cell asks for {cpus_per_cell:g} CPU / {gpus_per_cell:g} GPU")
        log.info("Ray executor: %s, %g CPU / %g GPU per cell", dict(total), cpus_per_cell, gpus_per_cell)

    def run(
        self,
        run_one: Callable[[T], AnyCell],
        tasks: Sequence[T],
        *,
        on_done: Callable[[AnyCell], None],
        failed: Callable[[T, str], AnyCell],
        before: Callable[[T], T] | None = None,
        local_victim: bool = False,
    ) -> list[AnyCell]:
        ray = self.ray
        options: dict[str, Any] = {"num_cpus": self.cpus, "num_gpus": self.gpus, "max_retries": self.max_retries}
        if local_victim:  # the victim listens on loopback: its attackers must run on this node
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            node = ray.get_runtime_context().get_node_id()
            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node_id=node, soft=False)
        remote = ray.remote(_in_ray_worker).options(**options)
        fn_ref = ray.put(run_one)
        threads = max(1, int(self.cpus))
        prepared = [before(t) if before is not None else t for t in tasks]
        pending: dict[Any, tuple[int, int]] = {}  # object ref -> (task index, attempt)
        for i, t in enumerate(prepared):
            pending[remote.remote(fn_ref, t, threads)] = (i, 0)
        out: list[AnyCell | None] = [None] * len(prepared)
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            ref = ready[0]
            i, attempt = pending.pop(ref)
            try:
                cell: AnyCell = ray.get(ref)
            except ray.exceptions.RayError as exc:
                first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
                cell = failed(prepared[i], f"{type(exc).__name__}: {first}")
            if cell.status == "failed" and attempt < self.retries:
                log.warning("cell %s failed (%s); submitting it again (%d/%d)", cell.id, cell.error, attempt + 1,
                            self.retries)
                pending[remote.remote(fn_ref, prepared[i], threads)] = (i, attempt + 1)
                continue
            out[i] = cell
            on_done(cell)
        return [c for c in out if c is not None]

    def close(self) -> None:
        if self._started and self.ray.is_initialized():
            self.ray.shutdown()
        self._started = False


def _check_reachable(address: str, timeout_s: float = 3.0) -> None:
    """Raise :class:`ExecutorError` unless ``address`` (``ray://HOST:PORT`` or ``HOST:PORT``) accepts a TCP
    connection within ``timeout_s``."""
    import socket

    hostport = address.removeprefix("ray://").rstrip("/")
    host, _, port = hostport.rpartition(":")
    default = 10001 if address.startswith("ray://") else 6379
    if not host:
        host, port = hostport, str(default)
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            pass
    except (OSError, ValueError) as exc:
        raise ExecutorError(f"cannot reach the Ray cluster at {address} ({type(exc).__name__}: {exc}); start one with "
                            f"`ray start --head` or leave out --address for a local Ray ({RAY_EXTRA_HINT})") from None


def make_executor(name: str, address: str | None = None, *, cpus_per_cell: float = 1.0,
                  gpus_per_cell: float = 0.0, retries: int = 1) -> CellExecutor:
    """``sequential`` or ``ray`` (raises :class:`ExecutorError` for an unknown name or an unusable Ray)."""
    if name == "sequential":
        if address:
            raise ExecutorError("--address is for --executor ray")
        return SequentialExecutor()
    if name == "ray":
        return RayExecutor(address, cpus_per_cell=cpus_per_cell, gpus_per_cell=gpus_per_cell, retries=retries)
    raise ExecutorError(f"unknown executor {name!r}: use sequential or ray")
