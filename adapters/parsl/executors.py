"""What asyncflow knows about each Parsl executor, and the resources it offers.

A :class:`Profile` records where an executor runs its tasks (in the driver
process, in worker processes on this host, or elsewhere), how many task slots it
has and what one slot offers.  The backend's capabilities (:func:`describe`)
and its way of cancelling follow from it.  A task's ``resources`` are checked
against one worker slot (HTEX, thread pool), so that a request that does not
fit fails at once with ResourceUnavailableError naming the task, or translated
into a ``parsl_resource_specification`` (WorkQueue, TaskVine, MPI).
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Sequence
from typing import Any

import parsl
from parsl.executors import HighThroughputExecutor
from parsl.executors import ThreadPoolExecutor as ParslThreadPoolExecutor
from parsl.executors.base import ParslExecutor
from parsl.launchers import SimpleLauncher, SingleNodeLauncher
from parsl.providers import LocalProvider

from ...errors import ResourceUnavailableError
from ...protocol import BackendInfo, Capabilities, Capability
from ...spec import Resources

C = Capability
NO_GPUS = "no accelerators configured (available_accelerators)"

#: What ``ParslExecutionBackend()`` (the local HTEX) declares; other configs vary.
DEFAULT_CAPABILITIES = Capabilities.of(
    C.CANCEL_QUEUED,
    C.CANCEL_RUNNING,
    C.EXECUTABLES,
    C.FUNCTIONS,
    C.KILL_EXECUTABLES,
    C.LARGE_PAYLOADS,
    C.PARALLEL,
    C.PIPELINE,
    C.RESOURCES,
    C.SERIALIZES,
    gpus=NO_GPUS,
    reports_running="Parsl tells the driver only how a task ended",
)


class Profile:
    """What asyncflow knows about one Parsl executor."""

    __slots__ = (
        "advice",
        "cores",
        "gpus",
        "htex",
        "in_process",
        "kind",
        "label",
        "local",
        "memory",
        "mpi",
        "sized",
        "slots",
    )

    def __init__(self, ex: ParslExecutor):
        self.label: str = ex.label
        self.kind = type(ex).__name__
        self.in_process = isinstance(ex, ParslThreadPoolExecutor)
        self.htex = isinstance(ex, HighThroughputExecutor)
        self.mpi = bool(getattr(ex, "enable_mpi_mode", False))
        self.memory: float | None = None  # MB per task slot, None: unknown
        self.gpus = 0
        #: what to do about a GPU request it refuses, where the backend knows
        self.advice: str | None = None
        # Executors asyncflow cannot size: two slots, so no false PARALLEL gap.
        self.local = False
        self.slots = 2
        #: ``slots`` is the executor's real worker count, not a guess
        self.sized = False
        self.cores: float | None = None
        if isinstance(ex, ParslThreadPoolExecutor):
            self.slots = int(ex.max_threads or 1)
            self.sized = True
            self.cores = float(self.slots)
            self.local = True
        elif isinstance(ex, HighThroughputExecutor):
            self._size_htex(ex)
        elif self.translates:
            self.gpus = -1  # scheduled by the manager

    def _size_htex(self, ex: HighThroughputExecutor) -> None:
        """HTEX workers are processes; only a local provider's run on this host,
        where the driver can reach them to cancel and can read the memory."""
        provider = ex.provider
        launcher = getattr(provider, "launcher", None)
        self.local = (
            isinstance(provider, LocalProvider)
            and isinstance(launcher, SingleNodeLauncher | SimpleLauncher)
            and sys.platform.startswith("linux")
        )
        per_node = ex.workers_per_node
        blocks = max(getattr(provider, "max_blocks", 1), 1)
        nodes = max(getattr(provider, "nodes_per_block", 1), 1)
        finite = math.isfinite(per_node)
        self.slots = int(per_node * blocks * nodes) if finite else 2
        self.sized = finite
        self.cores = float(ex.cores_per_worker)
        if ex.mem_per_worker:
            self.memory = ex.mem_per_worker * 1024
        elif self.local:
            self.memory = _physical_memory_mb()
        self.gpus = 1 if ex.available_accelerators else 0

    @property
    def translates(self) -> bool:
        return self.kind in ("WorkQueueExecutor", "TaskVineExecutor")

    def checks(self) -> bool:
        return self.in_process or self.htex or self.translates

    def resource_spec(self, res: Resources, name: str) -> dict[str, Any]:
        """Parsl's ``parsl_resource_specification`` for ``res``, or raise."""
        if self.translates:
            return self._manager_spec(res, name)
        if self.mpi:
            return self._mpi_spec(res, name)
        self._check_slot(res, name)
        return {}

    def _manager_spec(self, res: Resources, name: str) -> dict[str, Any]:
        """WorkQueue and TaskVine schedule by the request itself."""
        if res.ranks > 1:
            self._refuse(res, name, "no MPI launch")
        out: dict[str, Any] = {"cores": res.cores}
        if res.memory is not None:
            out["memory"] = res.memory
        if res.gpus:
            out["gpus"] = res.gpus
        return out

    def _mpi_spec(self, res: Resources, name: str) -> dict[str, Any]:
        if res.gpus or res.memory is not None or res.cores > 1:
            self._refuse(res, name, "MPI ranks only (ask for ranks=N)")
        return {"num_nodes": 1, "num_ranks": res.ranks, "ranks_per_node": res.ranks}

    def _check_slot(self, res: Resources, name: str) -> None:
        """Other executors take no specification: the request must fit one
        worker slot as it is."""
        if not self.checks():
            self._refuse(res, name, "no per-task resources asyncflow can express")
        if res.ranks > 1:
            self._refuse(res, name, "no MPI launch (use Parsl's MPIExecutor)")
        self._check_size(res, name)

    def _check_size(self, res: Resources, name: str) -> None:
        """Limits unknown here (``None``) are left to the executor."""
        if self.cores is not None and res.cores > self.cores:
            self._refuse(
                res,
                name,
                f"{self.cores:g} core(s) per worker"
                + ("" if self.in_process else "; raise cores_per_worker"),
            )
        if res.gpus > self.gpus:
            self._refuse(
                res,
                name,
                f"{self.gpus} accelerator(s) per worker ("
                + (self.advice or "available_accelerators")
                + ")",
            )
        memory = self.memory
        if res.memory is not None and memory is not None and res.memory > memory:
            self._refuse(res, name, f"{self.memory:.0f} MB per worker")

    def _refuse(self, res: Resources, name: str, why: str) -> None:
        raise ResourceUnavailableError(
            f"task {name!r} asks for {res}, but Parsl executor {self.label!r} "
            f"({self.kind}) offers {why}; lower the request or route the task to "
            "another executor with options={'executor': ...}"
        )


def _physical_memory_mb() -> float | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20
    except (ValueError, OSError, AttributeError):
        return None


def describe(
    profiles: dict[str, Profile],
    label: str,
    routable: bool,
    kill_functions: bool,
    chunked: bool = False,
) -> BackendInfo:
    """What a backend sending tasks to ``label`` (or, ``routable``, to any of
    ``profiles``) can promise: only what every executor in reach can do.
    ``chunked``: short tasks travel in chunks (see ``chunks``), the only place
    a piped task can wait for its upstreams."""
    scope = list(profiles.values()) if routable else [profiles[label]]
    caps = {C.FUNCTIONS, C.EXECUTABLES, C.LARGE_PAYLOADS}
    absent: dict[str, str] = {
        "reports_running": "Parsl tells the driver only how a task ended"
    }
    _offer(
        caps,
        absent,
        C.PARALLEL,
        sum(p.slots for p in scope) >= 2,
        "the executor has a single worker slot",
    )
    _serializing(scope, caps, absent)
    _cancelling(scope, kill_functions, caps, absent)
    _offer(
        caps,
        absent,
        C.RESOURCES,
        all(p.checks() for p in scope),
        "an executor takes no resource specification",
    )
    _offer(caps, absent, C.GPUS, all(p.gpus != 0 for p in scope), NO_GPUS)
    _offer(caps, absent, C.PIPELINE, chunked, _NO_PIPELINE)
    return BackendInfo(
        name=f"parsl-{label}",
        runtime=f"parsl {profiles[label].kind}",
        runtime_version=parsl.__version__,
        capabilities=Capabilities.of(*sorted(caps, key=lambda c: c.value), **absent),
    )


_NO_PIPELINE = (
    "Parsl tasks are sent when their inputs are ready; only tasks sent in chunks "
    "(to a sized HTEX, chunking=True) wait for their upstreams in the adapter"
)


def _offer(
    caps: set[Capability], absent: dict[str, str], cap: Capability, ok: bool, why: str
) -> None:
    if ok:
        caps.add(cap)
    else:
        absent[cap.value] = why


def _serializing(
    scope: Sequence[Profile], caps: set[Capability], absent: dict[str, str]
) -> None:
    """Only executors outside the driver process pickle what they run."""
    if all(p.in_process for p in scope):
        absent["serializes"] = "Parsl's ThreadPoolExecutor runs tasks in the driver"
    elif not any(p.in_process for p in scope):
        caps.add(C.SERIALIZES)
    else:
        absent["serializes"] = "some executors run tasks in the driver process"


def _cancelling(
    scope: Sequence[Profile],
    kill_functions: bool,
    caps: set[Capability],
    absent: dict[str, str],
) -> None:
    """Cancelling reaches only worker processes on this host (see ``cancel``)."""
    if all(p.local for p in scope):
        caps.update((C.KILL_EXECUTABLES, C.CANCEL_QUEUED))
    else:
        absent["cancel_queued"] = (
            "Parsl cannot take back a task its interchange holds, and the "
            "cancel marks of workers on other hosts are out of the driver's reach"
        )
        absent["kill_executables"] = (
            "AppFuture.cancel is not implemented in Parsl and workers on other "
            "hosts are out of the driver's reach; the engine abandons the task"
        )
    if all(p.local and not p.in_process for p in scope) and kill_functions:
        caps.add(C.CANCEL_RUNNING)
    elif any(p.in_process for p in scope):
        absent["cancel_running"] = (
            "a running Parsl ThreadPoolExecutor thread "
            "cannot be interrupted; its result is dropped"
        )
    else:
        absent["cancel_running"] = (
            "AppFuture.cancel is not implemented in Parsl; the worker cannot be "
            "reached (remote) or killing it was disabled"
        )
