"""The reference page's HPC dict, as a dask-jobqueue ``SLURMCluster`` this backend owns.

``DaskExecutionBackend({'resource': 'slurm', 'queue': ..., 'nodes': ...})`` must
mean what the same dict means to every other batch runtime, so the dict is
checked by :class:`asyncflow.hpc.Allocation` and turned into the cluster a Dask
user would write by hand.  The mapping:

====================  ========================================================
``queue``             ``SLURMCluster(queue=...)`` (``#SBATCH -p``)
``account``           ``account=`` (``-A``; ``project`` is the same)
``nodes``             that many jobs of one node each, submitted at start
``cores_per_node``    ``cores=`` (``--cpus-per-task``); asked of ``sinfo``
                      when absent.  One single-threaded worker process per
                      core, each advertising ``CPU=1``
``gpus_per_node``     ``--gres=gpu:<n>``; one worker per GPU (the cores shared
                      among them), each advertising ``GPU``
``walltime``          minutes, as Slurm's ``HH:MM:SS``
``memory_per_node``   (Dask and this dict only) MB per job; else the node's
                      ``RealMemory`` (``sinfo %m``), shared in proportion to
                      the cores asked for
``processes_per_node``  (Dask only) worker processes per job instead of one
                      per core; must divide ``cores_per_node``
``worker_init``       shell lines run on each node first (``module load ...``)
====================  ========================================================

Why one process per core: asyncflow's function tasks are Python, and threads
in one worker share its GIL; a process per core runs them in parallel, as the
page's thread and process backends do.  GPU nodes run one worker per GPU
instead, because a GPU cannot be split between processes.

What a hand-written cluster usually gets wrong is done here once:

* the scheduler listens on the login node's address toward the nodes
  (:func:`asyncflow.slurm.driver_address`), never on 127.0.0.1, which a node
  takes for its own loopback, nor on every interface;
* each worker listens on *its own node's* address toward the scheduler, found
  in the job script by the same route lookup, so that workers can fetch data
  from each other (dask-jobqueue's ``interface=`` needs an interface name that
  every node shares);
* every HTTP server (the scheduler's and each worker's dashboard, metrics and
  health) is on 127.0.0.1 with an ephemeral port: left alone they open
  0.0.0.0:8787 on the login node and on every node;
* before anything is queued, :func:`asyncflow.slurm.preflight` asks Slurm
  whether it could ever run the job, so an impossible request fails at once with
  Slurm's reason instead of waiting in the queue forever;
* every job carries the :class:`asyncflow.slurm.BatchJobs` name prefix, which
  reports a job waiting in the queue, notices one ending under the backend
  (walltime) and cancels them all at shutdown.  A job that ends fails every
  unfinished task with WorkerLostError naming Slurm's reason: Dask itself would
  leave the tasks that had not started waiting for workers that never come;
* the job logs go to a temp dir under the current directory, which the nodes
  must be able to write (``/tmp`` on the login node is not theirs); shutdown
  removes it.
"""

from __future__ import annotations

import contextlib
import math
import os
import shlex
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ...errors import BackendStartError, TaskDefinitionError
from ...hpc import SLURM, Allocation
from ...slurm import node_tmpdir
from .state import WorkerCapacity
from .values import MB

WHO = "DaskExecutionBackend"
#: keys Dask takes besides the page's
EXTRAS = frozenset({"memory_per_node", "processes_per_node", "worker_init"})
#: SLURMCluster options whose lists ours are added to rather than replaced by
_MERGED = ("job_script_prologue", "worker_extra_args", "job_extra_directives")
_HOST_VAR = "ASYNCFLOW_DASK_HOST"


def _count(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise TaskDefinitionError(
            f"{WHO}: {key!r} must be a whole number >= 1, got {value!r}"
        )
    return value


@dataclass(frozen=True)
class SlurmPlan:
    """The dict, checked in the constructor: a typo fails there, not in a job."""

    alloc: Allocation
    memory_per_node: int | None = None  # MB
    processes_per_node: int | None = None
    worker_init: str = ""

    @classmethod
    def from_mapping(cls, spec: Mapping[str, Any]) -> SlurmPlan:
        alloc, rest = Allocation.from_mapping(spec, WHO, extra=EXTRAS)
        alloc.require(WHO, SLURM)
        mem = rest.get("memory_per_node")
        procs = rest.get("processes_per_node")
        init = rest.get("worker_init", "")
        if not isinstance(init, str):
            raise TaskDefinitionError(
                f"{WHO}: 'worker_init' must be shell lines as one str, got {init!r}"
            )
        plan = cls(
            alloc,
            None if mem is None else _count("memory_per_node", mem),
            None if procs is None else _count("processes_per_node", procs),
            init,
        )
        if alloc.cores_per_node is not None:
            plan.shape(alloc.cores_per_node, 0)  # fail now on a bad split
        return plan

    def shape(self, cores: int, node_memory: int) -> Shape:
        """How one job of ``cores`` cores is cut into worker processes."""
        gpus = self.alloc.gpus_per_node
        procs = self.processes_per_node or (math.gcd(cores, gpus) if gpus else cores)
        if cores % procs or gpus % procs:
            raise TaskDefinitionError(
                f"{WHO}: 'processes_per_node' {procs} must divide cores_per_node "
                f"({cores}) and gpus_per_node ({gpus}), so that every worker gets "
                "the same share"
            )
        memory = self.memory_per_node or node_memory
        return Shape(cores, memory, procs, cores // procs, gpus // procs)


@dataclass(frozen=True)
class Shape:
    """One job: ``processes`` workers of ``threads`` threads and ``gpus`` GPUs."""

    cores: int
    memory: int  # MB per job
    processes: int
    threads: int
    gpus: int

    def workers(self, nodes: int) -> list[WorkerCapacity]:
        """The workers to expect, for resource checks before any has connected."""
        resources = {"CPU": float(self.threads)}
        if self.gpus:
            resources["GPU"] = float(self.gpus)
        info = {
            "nthreads": self.threads,
            "memory_limit": self.memory * MB // self.processes,
            "resources": resources,
        }
        return [WorkerCapacity(info) for _ in range(nodes * self.processes)]


def node_shape(plan: SlurmPlan) -> Shape:
    """Blocking: the job's shape, asking ``sinfo`` for what the dict leaves out."""
    cores = plan.alloc.cores_per_node
    if cores is not None and plan.memory_per_node is not None:
        return plan.shape(cores, plan.memory_per_node)
    node_cores, node_memory = _sinfo(plan.alloc.queue)
    if cores is None:
        cores = node_cores
    # The node's memory, shared in proportion when a job takes part of a node.
    return plan.shape(cores, max(1, node_memory * min(cores, node_cores) // node_cores))


def _sinfo(queue: str | None) -> tuple[int, int]:
    """The smallest node of ``queue`` (the default partition when None):
    CPUs and memory in MB."""
    res = subprocess.run(
        ["sinfo", "-h", "-o", "%P|%c|%m"], capture_output=True, text=True, timeout=60
    )
    rows = _partition_nodes(res.stdout, queue)
    if res.returncode != 0 or not rows:
        raise BackendStartError(
            f"{WHO}: `sinfo` does not describe the nodes of partition "
            f"{queue or '(default)'}: {res.stderr.strip() or 'no such partition'}; "
            "give 'cores_per_node' and 'memory_per_node' in the dict"
        )
    return min(c for c, _ in rows), min(m for _, m in rows)


def _partition_nodes(out: str, queue: str | None) -> list[tuple[int, int]]:
    """CPUs and memory of ``queue``'s node kinds in ``sinfo`` output; the
    default partition is the one with a ``*`` to its name."""
    rows = []
    for line in out.splitlines():
        name, _, rest = line.partition("|")
        cpus, _, mem = rest.partition("|")
        default = name.endswith("*")
        if (queue is None and default) or name.rstrip("*") == queue:
            with contextlib.suppress(ValueError):
                rows.append((int(cpus.rstrip("+")), int(mem.rstrip("+"))))
    return rows


def _find_host(python: str, scheduler_host: str) -> str:
    """A job script line setting ``$ASYNCFLOW_DASK_HOST`` to this node's address
    toward the scheduler: the local end of a UDP socket connected there (which
    sends nothing), as :func:`asyncflow.slurm.driver_address` does."""
    code = (
        "import socket, sys; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
        "s.connect((sys.argv[1], 9)); print(s.getsockname()[0])"
    )
    return (
        f"{_HOST_VAR}=$({shlex.quote(python)} -c {shlex.quote(code)} "
        f"{shlex.quote(scheduler_host)})"
    )


def cluster_options(
    plan: SlurmPlan,
    shape: Shape,
    host: str,
    job_name: str,
    dirs: tuple[str, str],
) -> dict[str, Any]:
    """``SLURMCluster`` keyword arguments for ``plan`` on a node of ``shape``;
    ``dirs``: the job logs' folder (shared with the nodes) and the scratch dir
    whose name the workers' ``TMPDIR`` takes on each node."""
    log_dir, scratch = dirs
    alloc = plan.alloc
    python = sys.executable
    paths = os.pathsep.join(dict.fromkeys(p or os.getcwd() for p in sys.path))
    resources = f"CPU={shape.threads}" + (f",GPU={shape.gpus}" if shape.gpus else "")
    extra = ["--nodes=1"]
    if alloc.gpus_per_node:
        extra.append(f"--gres=gpu:{alloc.gpus_per_node}")
    return {
        "queue": alloc.queue,
        "account": alloc.account,
        "cores": shape.cores,
        "processes": shape.processes,
        "memory": f"{shape.memory}MiB",  # Slurm's M is MiB
        "job_mem": f"{shape.memory}M",
        "walltime": alloc.walltime_hms,
        "python": python,
        "job_name": job_name,
        "log_directory": log_dir,
        "job_script_prologue": [
            *([plan.worker_init] if plan.worker_init else []),
            # the driver's modules (its script's directory included)
            f"export PYTHONPATH={shlex.quote(paths)}",
            node_tmpdir(scratch),  # Dask's scratch space and lock files go there
            _find_host(python, host),
        ],
        "job_extra_directives": extra,
        "worker_extra_args": [
            "--host",
            # unset: the job stops, saying why in its log
            f"${{{_HOST_VAR}:?no address of this node toward the scheduler}}",
            "--dashboard-address",
            "127.0.0.1:0",
            "--no-dashboard",
            "--resources",
            resources,
        ],
        "scheduler_options": {
            "host": host,
            "port": 0,
            "dashboard_address": "127.0.0.1:0",
            "dashboard": False,
        },
    }


def merge(ours: dict[str, Any], user: Mapping[str, Any]) -> dict[str, Any]:
    """The user's ``**options`` over ours; lists of script lines and arguments
    are added to (the user's prologue first: it may load modules), and
    ``scheduler_options`` updated key by key."""
    out = {**ours, **user}
    for key in _MERGED:
        if key in user:
            mine, theirs = list(ours.get(key) or []), list(user[key] or [])
            out[key] = theirs + mine if key == "job_script_prologue" else mine + theirs
    if "scheduler_options" in user:
        out["scheduler_options"] = {
            **ours["scheduler_options"],
            **(user["scheduler_options"] or {}),
        }
    return out
