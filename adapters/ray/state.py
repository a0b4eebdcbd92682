"""What the parts of :class:`RayExecutionBackend` share, in one object.

The process owner, the submitter, the completions and the head watch each
read and write the same bookkeeping: the sink, the tasks in flight, the
cluster's nodes, why Ray is gone.  Keeping it in one explicit object, passed
to each of them, gives one place to read what the backend tracks, and no part
reaches into another for it.  What the backend declares about the cluster is
derived here too, because the owner thread refreshes it once Ray is up.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import ray

from ...protocol import BackendInfo, Capabilities, Capability, CompletionSink
from ..toolkit import Lifecycle

__all__ = [
    "BATCH",
    "DEFAULT_CAPABILITIES",
    "RayState",
    "RayTask",
    "describe",
    "log",
]

log = logging.getLogger("asyncflow.ray")

C = Capability

#: completions worth one ray.get at once
BATCH = 32

_NO_RUNNING = "Ray tells the driver only how a task ended"

_ALWAYS = (
    C.FUNCTIONS,
    C.EXECUTABLES,
    C.CANCEL_QUEUED,
    C.CANCEL_RUNNING,
    C.KILL_EXECUTABLES,
    C.RESOURCES,
    C.SERIALIZES,
    C.LARGE_PAYLOADS,
    C.PIPELINE,
)

#: What a default local Ray offers, for listings that must not start Ray.
DEFAULT_CAPABILITIES = Capabilities.of(
    *_ALWAYS,
    C.PARALLEL,
    gpus="depends on the cluster: declared when a node reports GPUs",
    reports_running=_NO_RUNNING,
)


class RayTask:
    """A task in flight: its ObjectRef, and what cancelling it must know."""

    __slots__ = ("command", "name", "ref", "upstreams")

    def __init__(
        self,
        name: str,
        ref: ray.ObjectRef,
        command: bool,
        upstreams: frozenset[str] = frozenset(),
    ):
        self.name = name
        self.ref = ref
        self.command = command
        self.upstreams = upstreams  # piped: the uids of tasks it waits for


@dataclass(eq=False)
class RayState:
    """The backend's settings and bookkeeping.

    ``life`` holds the started/closed guards, the event loop and the
    background jobs (command kills); ``tasks`` the tasks in flight, and
    ``cancelled`` the refs of cancelled ones whose completion is still to be
    read, so that Ray does not log their errors.
    """

    address: str | None
    init_kwargs: dict[str, Any]
    fail_infeasible: bool
    loopback: bool
    life: Lifecycle
    info: BackendInfo
    token: str = field(default_factory=lambda: secrets.token_hex(6))
    sink: CompletionSink | None = None
    tasks: dict[str, RayTask] = field(default_factory=dict)
    cancelled: dict[str, ray.ObjectRef] = field(default_factory=dict)
    #: tasks that failed in Ray: Ray fails their piped dependents itself
    failed: set[str] = field(default_factory=set)
    client: bool = False  # attached through Ray Client (ray://)
    nodes: list[Mapping[str, float]] = field(default_factory=list)
    backlog: int = BATCH  # tasks in flight beyond which reports may wait
    lost: str | None = None  # why Ray is gone (see watch.py)
    #: called with ``lost`` when Ray goes: parts holding tasks outside
    #: ``tasks`` (the chunks) fail them too
    lost_hooks: list[Callable[[str], None]] = field(default_factory=list)

    def read_cluster(self) -> None:
        """Nodes, backlog and info from the Ray this process is connected to."""
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        self.nodes = nodes
        cpus = sum(n.get("CPU", 0) for n in nodes)
        self.backlog = max(BATCH, int(2 * cpus))
        gpus = max((n.get("GPU", 0) for n in nodes), default=0)
        self.info = describe(self.address, cpus, gpus)


def describe(
    address: str | None, cpus: float, gpus: float, unknown: str = ""
) -> BackendInfo:
    """The backend's info for a cluster of ``cpus`` and ``gpus``; ``unknown``
    says why GPUs are not declared while the cluster is not known yet."""
    caps = list(_ALWAYS)
    absent: dict[str, str] = {"reports_running": _NO_RUNNING}
    if cpus >= 2:
        caps.append(C.PARALLEL)
    else:
        absent["parallel"] = f"the Ray cluster has {cpus:g} CPU(s)"
    if gpus > 0:
        caps.append(C.GPUS)
    else:
        absent["gpus"] = unknown or "the Ray cluster has no GPUs"
    return BackendInfo(
        name="ray" if address is None else "ray-attached",
        runtime="ray",
        runtime_version=ray.__version__,
        capabilities=Capabilities.of(*caps, **absent),
    )
