"""What radical.pilot needs set up: the pilot description, and the environment.

The docs page's keys are turned into a PilotDescription radical.pilot takes.
The page describes a pilot in batch-system terms (``nodes``, ``cores_per_node``,
``walltime`` in minutes, ``account``), none of which ``PilotDescription.verify()``
accepts, so they are translated here, before anything starts: a typo or an
impossible pilot should fail in the constructor, not a minute later in a
background thread.  The same pass works out the :class:`Layout` the backend
needs to refuse oversized tasks without a round trip: how many cores are left
for executables, how big the raptor workers are, whether MPI can run.
"""

from __future__ import annotations

import contextlib
import difflib
import math
import os
import shutil
import sys
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from ...errors import TaskDefinitionError
from ._rp import rp, ru

__all__ = ["Layout", "pilot_description", "plan", "spawn_environment"]

#: the keys of the docs page, translated into PilotDescription keys
PAGE_KEYS = frozenset(
    {
        "resource",
        "queue",
        "nodes",
        "cores_per_node",
        "gpus_per_node",
        "walltime",
        "project",
        "account",
    }
)
#: PilotDescription keys that pass through unchanged
NATIVE_KEYS = frozenset(rp.PilotDescription._schema) - {"uid"}
DEFAULT_LOCAL_CORES = 2
DEFAULT_WALLTIME = 60  # minutes; the watchdog, not the walltime, bounds orphans

_RCFGS: dict[str, Any] | None = None
_RCFGS_LOCK = threading.Lock()


def _resource_configs() -> dict[str, Any]:
    global _RCFGS
    with _RCFGS_LOCK:
        if _RCFGS is None:
            _RCFGS = dict(ru.Config("radical.pilot.resource", name="*", expand=False))
        return _RCFGS


def _resource_config(resource: str) -> Mapping[str, Any]:
    site, _, host = resource.partition(".")
    rcfgs = _resource_configs()
    cfg = rcfgs.get(site, {}).get(host) if host else None
    if cfg is None:
        known = sorted(f"{s}.{h}" for s, hosts in rcfgs.items() for h in hosts)
        close = difflib.get_close_matches(resource, known, n=3)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        raise TaskDefinitionError(
            f"RadicalExecutionBackend: unknown resource {resource!r}{hint} "
            f"(radical.pilot knows {len(known)} resources, e.g. 'local.localhost'; "
            "add your own with a resource config file)"
        )
    return cfg


@dataclass(frozen=True)
class Layout:
    """What the pilot looks like, worked out before it starts."""

    description: dict[str, Any]  # the PilotDescription, as a dict
    resource: str
    local: bool  # the agent runs on this host (shared filesystem, same PATH)
    task_cores: int  # cores left for executable tasks (0: unknown)
    cores_per_node: int  # 0: unknown
    gpus: int
    memory: int | None  # MB for the whole pilot, None when unknown
    function_cores: int  # raptor worker slots; 0: no function tasks
    worker_cores: int  # slots per raptor worker
    n_workers: int
    mpi: bool  # ranks > 1 can run


def _positive_int(key: str, value: Any, zero_ok: bool = False) -> int:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or (value != int(value))
        or value < (0 if zero_ok else 1)
    ):
        raise TaskDefinitionError(
            f"RadicalExecutionBackend: {key!r} must be a whole number "
            f"{'>= 0' if zero_ok else '>= 1'}, got {value!r}"
        )
    return int(value)


def pilot_description(
    resources: Mapping[str, Any] | None = None, function_cores: int | None = None
) -> dict[str, Any]:
    """The PilotDescription (as a dict) the backend would submit for ``resources``.

    Useful to check a configuration without starting anything.
    """
    return plan(resources, function_cores).description


def plan(
    resources: Mapping[str, Any] | None, function_cores: int | None = None
) -> Layout:
    """Check ``resources`` and work out the pilot; TaskDefinitionError if wrong."""
    if not isinstance(resources, Mapping | None):
        raise TaskDefinitionError(
            "RadicalExecutionBackend() takes a dict such as "
            f"{{'resource': 'local.localhost'}}, got {type(resources).__name__}"
        )
    cfg = dict(resources or {})
    unknown = set(cfg) - PAGE_KEYS - NATIVE_KEYS
    if unknown:
        raise TaskDefinitionError(
            f"RadicalExecutionBackend: unknown key(s) {sorted(unknown)}; valid keys "
            f"are {sorted(PAGE_KEYS)} and the PilotDescription keys "
            f"{sorted(NATIVE_KEYS - PAGE_KEYS)}"
        )
    for a, b in (("walltime", "runtime"), ("account", "project")):
        if a in cfg and b in cfg and cfg[a] != cfg[b]:
            raise TaskDefinitionError(
                f"RadicalExecutionBackend: {a!r} and {b!r} mean the same thing; "
                "give only one"
            )
    resource = cfg.pop("resource", None) or "local.localhost"
    if not isinstance(resource, str):
        raise TaskDefinitionError(f"'resource' must be a str, got {resource!r}")
    rcfg = _resource_config(resource)
    rcfg_cpn = int(rcfg.get("cores_per_node") or 0)
    rcfg_gpn = int(rcfg.get("gpus_per_node") or 0)
    fake = bool(rcfg.get("fake_resources"))
    local = resource.startswith("local.")

    pd: dict[str, Any] = {"resource": resource}
    walltime = cfg.pop("walltime", cfg.pop("runtime", DEFAULT_WALLTIME))
    pd["runtime"] = _positive_int(
        "walltime", math.ceil(walltime) if isinstance(walltime, float) else walltime
    )
    project = cfg.pop("account", cfg.pop("project", None))
    if project is not None:
        pd["project"] = str(project)

    nodes = cfg.pop("nodes", None)
    cpn = cfg.pop("cores_per_node", None)
    gpn = cfg.pop("gpus_per_node", None)
    cores = cfg.pop("cores", None)
    gpus = cfg.pop("gpus", None)
    if cores is not None and (nodes is not None or cpn is not None):
        raise TaskDefinitionError(
            "RadicalExecutionBackend: give either 'cores' or 'nodes'/"
            "'cores_per_node', not both"
        )
    if gpus is not None and gpn is not None:
        raise TaskDefinitionError(
            "RadicalExecutionBackend: give either 'gpus' or 'gpus_per_node'"
        )
    n_nodes = _positive_int("nodes", nodes) if nodes is not None else 1
    node_cores = _positive_int("cores_per_node", cpn) if cpn is not None else rcfg_cpn
    if cores is not None:
        total = _positive_int("cores", cores)
    elif nodes is None and cpn is None and local:
        total = DEFAULT_LOCAL_CORES
    elif node_cores:
        total = n_nodes * node_cores
    else:
        total = 0  # radical.pilot counts whole nodes; capacity unknown here
    if gpn is not None:
        n_gpus = n_nodes * _positive_int("gpus_per_node", gpn, zero_ok=True)
    elif gpus is not None:
        n_gpus = _positive_int("gpus", gpus, zero_ok=True)
    elif nodes is not None and cpn is None and cores is None:
        n_gpus = n_nodes * rcfg_gpn  # whole nodes come with their GPUs
    else:
        n_gpus = 0

    # Raptor: one master core plus the worker slots.  Where radical.pilot fakes
    # the node (local.localhost), it comes on top of the task cores; on a real
    # machine it is carved out of the pilot.
    if function_cores is None:
        fn_cores = total if fake else max(1, min(node_cores or total, total // 2))
    else:
        fn_cores = _positive_int("function_cores", function_cores, zero_ok=True)
    if not total and fn_cores:
        fn_cores = 1
    worker_cores = min(fn_cores, node_cores) if node_cores else fn_cores
    n_workers = math.ceil(fn_cores / worker_cores) if fn_cores else 0
    raptor = (1 + fn_cores) if fn_cores else 0
    if fake:
        pilot_cores = total + raptor
        task_cores = total
    else:
        pilot_cores = total
        task_cores = total - raptor
        if total and task_cores < 0:
            raise TaskDefinitionError(
                f"RadicalExecutionBackend: the pilot has {total} cores but function "
                f"tasks need {raptor} (a raptor master and {fn_cores} worker "
                "slots); ask for more cores or pass function_cores=0"
            )
    if total or cores is not None or cpn is not None:
        pd["cores"] = pilot_cores
        if n_gpus:
            pd["gpus"] = n_gpus
    else:
        pd["nodes"] = n_nodes
    memory = cfg.pop("memory", None)
    if memory is not None:
        pd["memory"] = _positive_int("memory", memory)
    mem_per_node = int(rcfg.get("mem_per_node") or 0)
    mem_total = pd.get("memory") or (mem_per_node * n_nodes if mem_per_node else None)
    # radical.pilot's default ends the driver (SIGTERM to its main thread) when
    # the pilot fails; asyncflow fails the pilot's tasks instead
    pd["exit_on_error"] = False
    pd.update(cfg)  # the remaining native keys pass through
    try:
        rp.PilotDescription(dict(pd)).verify()
    except Exception as exc:
        raise TaskDefinitionError(
            f"RadicalExecutionBackend: radical.pilot rejects the pilot {pd}: {exc}"
        ) from None
    mpi = not local or bool(shutil.which("mpiexec") or shutil.which("mpirun"))
    return Layout(
        pd,
        resource,
        local,
        max(task_cores, 0),
        node_cores,
        n_gpus,
        mem_total,
        fn_cores,
        worker_cores,
        n_workers,
        mpi,
    )


_ENV_LOCK = threading.Lock()


@contextlib.contextmanager
def spawn_environment(base: str) -> Iterator[None]:
    """The environment radical.pilot's client processes must be spawned with.

    radical.pilot passes them no environment of its own, so the variables it
    needs (PATH and VIRTUAL_ENV for the agent, RADICAL_PROFILE and RADICAL_REPORT
    off, TMPDIR and RADICAL_BASE under the runtime's temp directory) are set only
    while those processes are spawned, then restored: the user's process keeps
    its own.  Serialised, because two runtimes may start at once.
    """
    venv = os.environ.get("VIRTUAL_ENV") or (
        sys.prefix if sys.prefix != sys.base_prefix else ""
    )
    bindir = os.path.dirname(sys.executable)
    path = os.environ.get("PATH", "")
    if path.split(os.pathsep)[:1] != [bindir]:
        path = bindir + os.pathsep + path
    tmp = os.path.join(base, "tmp")
    os.makedirs(tmp, exist_ok=True)
    want = {
        "PATH": path,
        "RADICAL_PROFILE": "False",
        "RADICAL_REPORT": "False",
        "RADICAL_BASE": base,
        "RADICAL_PILOT_BASE": base,
        "TMPDIR": tmp,
    }
    if venv:
        want["VIRTUAL_ENV"] = venv
    with _ENV_LOCK:
        saved = {k: os.environ.get(k) for k in want}
        os.environ.update(want)
        try:
            yield
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
