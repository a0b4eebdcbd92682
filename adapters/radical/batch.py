"""``'resource': 'slurm'``: the pilot as a job of the Slurm cluster this host uses.

radical.pilot reaches a batch system only through a named site's resource
config (``resource_<site>.json``) and ships none for "the cluster I am logged
in to".  So the runtime writes one for the pilot it is about to submit, into
its own temp directory, and points radical.pilot's config lookup there
(``RADICAL_CONFIG_USER_DIR``, read when the session starts).  That variable
replaces the user's own config directory, so the user's files are linked in
beside the generated one: their own sites and settings still apply.

Three more things radical.pilot does not do on its own, done here:

* it advertises its ZMQ endpoints on the first interface in radical.utils'
  preference list (127.0.0.1 if none matches), but the agent runs on a compute
  node and must dial back to the login node: the interface that carries
  :func:`asyncflow.slurm.driver_address` is named in ``RADICAL_DEFAULT_IFACE``;
* its PSI/J launcher drops the PilotDescription's ``job_name`` (and GPUs), so
  the job would be called after its script and could not be found by name;
  ``sbatch`` reads ``SBATCH_JOB_NAME`` (and ``SBATCH_GRES``) from the
  launcher's environment instead, and the name carries
  :class:`~asyncflow.slurm.BatchJobs`' prefix: the job is watched, cancelled
  at close, and cancelled by the guard if the driver is killed;
* an impossible request (an unknown partition, more nodes than exist) would
  fail only after the session's 20 s start: :func:`asyncflow.slurm.preflight`
  asks Slurm first.
"""

from __future__ import annotations

import contextlib
import glob
import json
import math
import os
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from ...errors import BackendStartError
from ...hpc import SLURM, Allocation
from ...slurm import BatchJobs, Job, driver_address, preflight
from ._rp import ru

__all__ = [
    "RP_RESOURCE",
    "SlurmPilot",
    "advertised_interface",
    "allocation",
    "resource_config",
    "sinfo_cores_per_node",
]

WHO = "RadicalExecutionBackend"
#: the name radical.pilot knows the generated resource config by (site.label)
RP_SITE, RP_LABEL = "asyncflow", SLURM
RP_RESOURCE = f"{RP_SITE}.{RP_LABEL}"
#: Slurm job states in which the pilot's nodes are still there
_ALIVE = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED"}


def sinfo_cores_per_node(queue: str | None) -> int:
    """The partition's cores per node (the smallest node's, if they differ)."""
    sinfo = shutil.which("sinfo")
    if sinfo is None:
        raise BackendStartError(
            f"{WHO}: 'resource': 'slurm' needs Slurm's sinfo on PATH to find the "
            "cores per node; run on a login node, or give 'cores_per_node'"
        )
    res = subprocess.run(
        [sinfo, "-h", "-o", "%c %P", *(["-p", queue] if queue else [])],
        capture_output=True,
        text=True,
        timeout=60,
    )
    cores = _node_cores(res.stdout, queue)
    if res.returncode != 0 or not cores:
        # an unknown partition, say: Slurm's own words are the clearest
        preflight(Allocation(SLURM, queue=queue), WHO)
        where = f"partition {queue!r}" if queue else "the default partition"
        raise BackendStartError(
            f"{WHO}: `sinfo` lists no nodes in {where} "
            f"({res.stderr.strip() or 'no output'}); check 'queue' against "
            "`sinfo`, or give 'cores_per_node'"
        )
    return min(cores)


def _node_cores(out: str, queue: str | None) -> list[int]:
    """Cores per node of each row of ``sinfo -o '%c %P'`` for ``queue``."""
    rows = [line.split() for line in out.splitlines() if line.strip()]
    if not queue:  # the default partition is the one marked with '*'
        rows = [r for r in rows if r[-1].endswith("*")] or rows
    return [int(r[0].rstrip("+")) for r in rows if r[0].rstrip("+").isdigit()]


def allocation(pd: Mapping[str, Any], cores_per_node: int) -> Allocation:
    """The batch job radical.pilot will ask for, given the PilotDescription.

    radical.pilot asks for ``ceil(cores / cores_per_node)`` whole nodes, so
    that is what the preflight checks and what the job gets.
    """
    nodes = max(1, math.ceil(int(pd.get("cores") or 0) / cores_per_node))
    total_gpus = int(pd.get("gpus") or 0)
    return Allocation(
        resource=SLURM,
        queue=pd.get("queue") or None,
        nodes=nodes,
        cores_per_node=cores_per_node,
        gpus_per_node=math.ceil(total_gpus / nodes),
        walltime=int(pd["runtime"]),
        account=pd.get("project"),
    )


def resource_config(alloc: Allocation) -> dict[str, Any]:
    """radical.pilot's resource config for ``alloc``'s cluster.

    The agent uses the client's virtualenv on the shared filesystem (no pip
    run on the nodes) and starts tasks as ``srun`` job steps; ``exclusive``
    off, so the job asks for the dict's cores, not whole nodes.
    """
    return {
        "description": "the Slurm cluster this host submits to (asyncflow)",
        "default_schema": "local",
        "schemas": {
            "local": {
                "job_manager_endpoint": "slurm://localhost/",
                "filesystem_endpoint": "file://localhost/",
            }
        },
        "resource_manager": "SLURM",
        "agent_config": "default",
        "agent_scheduler": "CONTINUOUS",
        "agent_spawner": "POPEN",
        "launch_methods": {"order": ["SRUN", "FORK"], "SRUN": {}, "FORK": {}},
        "default_queue": alloc.queue or "",
        "cores_per_node": alloc.cores_per_node,
        "gpus_per_node": alloc.gpus_per_node,
        "rp_version": "installed",
        "virtenv_mode": "local",
        "python_dist": "default",
        "system_architecture": {"exclusive": False},
    }


def config_dir(base: str, alloc: Allocation) -> str:
    """Write the resource config under ``base``; the RADICAL_CONFIG_USER_DIR.

    The user's own config files (``$RADICAL_CONFIG_USER_DIR`` or ``$HOME``,
    ``.radical/*/configs``) are linked in, since the variable hides them.
    """
    root = os.path.join(base, "rcfg")
    ours = os.path.join(root, ".radical", "pilot", "configs")
    os.makedirs(ours)
    mine = os.path.join(ours, f"resource_{RP_SITE}.json")
    user = os.environ.get("RADICAL_CONFIG_USER_DIR") or os.environ.get("HOME")
    if user:
        for src in glob.glob(os.path.join(user, ".radical", "*", "configs", "*")):
            dst = os.path.join(root, os.path.relpath(src, user))
            if dst != mine and not os.path.exists(dst):
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                os.symlink(os.path.realpath(src), dst)
    with open(mine, "w") as f:
        json.dump({RP_LABEL: resource_config(alloc)}, f, indent=1)
    return root


def interface_of(address: str) -> str | None:
    """The name of this host's interface that carries ``address``."""
    import netifaces  # radical.utils' own dependency

    for name in netifaces.interfaces():
        for entry in netifaces.ifaddresses(name).get(netifaces.AF_INET, []):
            if entry.get("addr") == address:
                return str(name)
    return None


@contextlib.contextmanager
def advertised_interface(iface: str | None) -> Iterator[None]:
    """Make this process advertise ``iface`` while radical.pilot starts.

    radical.utils reads ``RADICAL_DEFAULT_IFACE`` once per process, into a
    singleton that may already exist: the variable alone would reach only the
    processes spawned from now on, not the session's proxy in this one.
    """
    if not iface:
        yield
        return
    cfg = ru.DefaultConfig()
    saved = cfg.get("iface")
    cfg["iface"] = [iface]
    try:
        yield
    finally:
        cfg["iface"] = saved


class SlurmPilot:
    """The Slurm side of one runtime: the job asked for, named, watched, ended.

    Queue states go to every backend attached to the runtime (several may
    share it), and to one that attaches later, so a pilot waiting in the
    queue shows as waiting.  A job that ends under the runtime is passed to
    ``lost`` with the reason in Slurm's words.
    """

    def __init__(self, alloc: Allocation, lost: Callable[[str], object]) -> None:
        self.allocation = alloc
        self.jobs = BatchJobs(WHO, report=self._report, lost=self._lost)
        self._on_lost = lost
        self._sinks: dict[int, tuple[object, Any]] = {}
        self._last: tuple[str, str] | None = None
        self._lock = threading.Lock()

    @property
    def job_name(self) -> str:
        return self.jobs.prefix

    def prepare(self, base: str) -> dict[str, str]:
        """Before the session starts: ask Slurm, start the guard, write the
        config; returns the environment radical.pilot must be spawned with."""
        preflight(self.allocation, WHO)
        self.jobs.start()
        env = {
            "RADICAL_CONFIG_USER_DIR": config_dir(base, self.allocation),
            "SBATCH_JOB_NAME": self.jobs.prefix,
        }
        if self.allocation.gpus_per_node:  # PSI/J drops GPUs, as it drops the name
            env["SBATCH_GRES"] = f"gpu:{self.allocation.gpus_per_node}"
        if not os.environ.get("RADICAL_DEFAULT_IFACE"):  # the user's choice wins
            iface = interface_of(driver_address())
            if iface:
                env["RADICAL_DEFAULT_IFACE"] = iface
        return env

    # -- queue states, to the backends' sinks ----------------------------------------
    def attach(self, backend: object, sink: Any) -> None:
        with self._lock:
            self._sinks[id(backend)] = (backend, sink)
            last = self._last
        if last is not None:
            _tell(backend, sink, *last)

    def detach(self, backend: object) -> None:
        with self._lock:
            self._sinks.pop(id(backend), None)

    def _report(self, state: str, detail: str) -> None:
        with self._lock:
            self._last = (state, detail)
            targets = list(self._sinks.values())
        for backend, sink in targets:
            _tell(backend, sink, state, detail)

    # -- the end -----------------------------------------------------------------------
    def _lost(self, message: str) -> None:
        self._on_lost(f"the pilot's {message}{self._hint(message)}")

    def _hint(self, message: str) -> str:
        if "walltime" not in message:
            return ""
        return (
            f" (the dict's 'walltime': {self.allocation.walltime} minute(s); "
            "raise it if the workflow needs longer)"
        )

    def ended(self, uid: str, state: str) -> str:
        """Why radical.pilot's pilot ``uid`` ended, in Slurm's words if it knows."""
        head = f"the pilot {uid} on 'slurm' ended ({state})"
        why = self.gone()
        if why is not None:
            return f"{head}: {why}"
        return (
            f"{head}, before its Slurm job did (the dict's 'walltime': "
            f"{self.allocation.walltime} minute(s))"
        )

    def gone(self) -> str | None:
        """Why the pilot's job ended or is ending, or None while it runs.

        A job that reached its walltime shows as COMPLETING (reason TimeLimit)
        while Slurm kills its steps, which is when its tasks die: that counts.
        """
        jobs: list[Job] = []
        with contextlib.suppress(Exception):
            jobs = self.jobs.jobs()
        for job in jobs:
            if job.state == "COMPLETING" and job.reason == "TimeLimit":
                why = f"Slurm job {job.id} reached its walltime of {job.time_limit}"
            elif job.state not in _ALIVE:
                why = job.describe()
            else:
                continue
            return why + self._hint(why)
        return None

    def over(self) -> bool:
        """The pilot's job was in Slurm's queue and has ended.

        Not when Slurm lists no job yet: its ``sbatch`` may still be coming.
        """
        try:
            jobs = self.jobs.jobs()
        except Exception:
            return False
        return bool(jobs) and not any(j.state in _ALIVE for j in jobs)

    def close(self) -> list[Job]:
        """Cancel what is left of the job and wait until Slurm lists it no more."""
        return self.jobs.close()


def _tell(backend: object, sink: Any, state: str, detail: str) -> None:
    report = getattr(sink, "set_backend_state", None)
    if report is not None:
        with contextlib.suppress(Exception):  # never into BatchJobs' thread
            report(backend, state, detail)
