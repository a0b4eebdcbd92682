"""What the constructor decides, before any runtime exists.

``DaskExecutionBackend(address, **options)`` means one of four things (own a
LocalCluster, own a SLURMCluster from the page's HPC dict, attach to an
address, a client or a cluster object), and the options go to a different
place for each.  Deciding it once, in :class:`Settings`, lets a wrong argument
fail in the constructor and lets every other part read the decision instead of
re-deriving it.  :meth:`Settings.describe` is the ``info`` the engine reads,
refined each time the list of workers changes.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import distributed
from distributed import Client

from ...errors import TaskDefinitionError
from ...hpc import is_allocation
from ...protocol import BackendInfo, Capabilities, Capability
from .slurm import SlurmPlan

if TYPE_CHECKING:
    from .state import WorkerCapacity

C = Capability

DEFAULT_CLUSTER: dict[str, Any] = {
    "n_workers": 2,
    "threads_per_worker": 1,
    "processes": True,
    "host": "127.0.0.1",
    "dashboard_address": None,
}
CONNECT_TIMEOUT = 30.0
CLOSE_TIMEOUT = 30.0

DEFAULT_CAPABILITIES = Capabilities.of(
    C.FUNCTIONS,
    C.EXECUTABLES,
    C.KILL_EXECUTABLES,
    C.RESOURCES,
    C.SERIALIZES,
    C.LARGE_PAYLOADS,
    C.PARALLEL,
    C.PIPELINE,
    reports_running="Dask tells its scheduler, not the client, when a task starts",
    cancel_queued="Dask cancels through its scheduler, asynchronously: a worker "
    "that frees up before the cancel reaches it may still start a queued task",
    cancel_running="Dask cannot interrupt a running Python function: its worker "
    "thread runs on and the result is discarded (executables are killed)",
    gpus="no Dask worker advertises a 'GPU' resource; start workers with "
    "--resources GPU=<n>",
)


@dataclass(frozen=True)
class Settings:
    """The constructor's arguments, sorted by where they go."""

    #: an address, Client or cluster object to attach to; None: own the cluster
    target: Any
    #: the page's HPC dict, checked; None unless given one
    plan: SlurmPlan | None
    #: LocalCluster or SLURMCluster keyword arguments (owned clusters only)
    cluster_options: dict[str, Any]
    #: Client keyword arguments (attached backends only)
    client_options: dict[str, Any]
    #: the caller's own options, to tell theirs from our defaults
    user_options: dict[str, Any]
    #: whether tasks run in worker processes, as far as the arguments tell
    processes: bool

    @classmethod
    def from_args(cls, address: Any, options: dict[str, Any]) -> Settings:
        # the dict is checked here: a typo fails in the constructor, not in a job
        plan = (
            SlurmPlan.from_mapping(address)
            if isinstance(address, Mapping) and is_allocation(address)
            else None
        )
        target = None if plan is not None else address
        if address is None:
            cluster = {**DEFAULT_CLUSTER, **options}
        else:
            cluster = dict(options) if plan is not None else {}
        if target is None:
            processes = bool(cluster.get("processes", True))
        else:  # a wrong type of target fails here
            processes = not address_of(target)[0].startswith("inproc://")
        return cls(
            target=target,
            plan=plan,
            cluster_options=cluster,
            client_options=options if target is not None else {},
            user_options=options,
            processes=processes,
        )

    @property
    def owns_cluster(self) -> bool:
        return self.target is None

    def describe(self, workers: Sequence[WorkerCapacity]) -> BackendInfo:
        """The backend's info given the workers known (or planned) so far."""
        supported = set(DEFAULT_CAPABILITIES.supported)
        reasons = dict(DEFAULT_CAPABILITIES.reasons)
        threads, gpus = self._capacity(workers)
        if threads < 2:
            supported.discard(C.PARALLEL)
            reasons[C.PARALLEL] = "the Dask cluster has a single worker thread"
        if gpus:
            supported.add(C.GPUS)
            reasons.pop(C.GPUS, None)
        elif self.plan is not None:
            reasons[C.GPUS] = "the allocation has no GPUs; add 'gpus_per_node'"
        return BackendInfo(
            name="dask" if self.processes else "dask-threads",
            runtime="dask.distributed",
            runtime_version=distributed.__version__,
            capabilities=Capabilities(frozenset(supported), reasons),
        )

    def _capacity(self, workers: Sequence[WorkerCapacity]) -> tuple[int, bool]:
        """Worker threads and whether any GPU: counted, else expected."""
        if workers:
            threads = sum(w.nthreads for w in workers)
            return threads, any(w.resources.get("GPU", 0) > 0 for w in workers)
        if self.plan is not None:  # refined once Slurm describes the nodes
            alloc = self.plan.alloc
            return alloc.nodes * (alloc.cores_per_node or 2), alloc.gpus_per_node > 0
        if self.owns_cluster:
            return _local_capacity(self.cluster_options)
        return 2, False  # refined once connected


def _local_capacity(o: dict[str, Any]) -> tuple[int, bool]:
    """What the ``LocalCluster`` these options make will have."""
    threads = (o.get("n_workers") or os.cpu_count() or 1) * (
        o.get("threads_per_worker") or 1
    )
    return threads, bool((o.get("resources") or {}).get("GPU"))


def address_of(target: Any) -> tuple[str, Any]:
    """The scheduler address and security of what the caller attaches to."""
    if isinstance(target, str):
        return target, None
    if isinstance(target, Client):
        return target.scheduler.address, target.security
    address = getattr(target, "scheduler_address", None)
    if isinstance(address, str):
        return address, getattr(target, "security", None)
    raise TaskDefinitionError(
        "DaskExecutionBackend(address) takes a scheduler address such as "
        "'tcp://127.0.0.1:8786', a distributed.Client, a cluster object or an "
        f"HPC dict such as {{'resource': 'slurm', 'nodes': 2}}, got {target!r}"
    )
