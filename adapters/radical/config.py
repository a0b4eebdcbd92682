"""What radical.pilot needs set up: the pilot description, and the environment.

The docs page's keys are turned into a PilotDescription radical.pilot takes.
The page describes a pilot in batch-system terms (``nodes``, ``cores_per_node``,
``walltime`` in minutes, ``account``), none of which ``PilotDescription.verify()``
accepts, so they are translated here, before anything starts: a typo or an
impossible pilot should fail in the constructor, not a minute later in a
background thread.  The same pass works out the :class:`Layout` the backend
needs to refuse oversized tasks without a round trip: how many cores are left
for executables, how big the raptor workers are, whether MPI can run.

``'resource': 'slurm'`` has no radical.pilot resource config; its nodes come
from the dict (or ``sinfo``) and :mod:`.batch` writes the config at start.
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
from ...hpc import PAGE_KEYS, SLURM, Allocation
from . import batch
from ._rp import rp, ru
from .sizing import Capacity, Raptor, Site, capacity, positive_int, raptor_share

__all__ = ["Layout", "pilot_description", "plan", "spawn_environment"]

#: PilotDescription keys that pass through unchanged
NATIVE_KEYS = frozenset(rp.PilotDescription._schema) - {"uid"}
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
    #: ``'resource': 'slurm'``: the batch job the pilot is (see :mod:`.batch`)
    allocation: Allocation | None = None


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
    cfg = _checked(resources)
    resource = cfg.pop("resource", None) or "local.localhost"
    if not isinstance(resource, str):
        raise TaskDefinitionError(f"'resource' must be a str, got {resource!r}")
    pd = _time_and_account(resource, cfg)
    site = _site(resource, cfg)
    cap = capacity(cfg, site)
    raptor = raptor_share(cap, site, function_cores)
    pd.update(_size(cap, raptor))
    memory, mem_total = _memory(cfg, site, cap.nodes)
    if memory is not None:
        pd["memory"] = memory
    # radical.pilot's default ends the driver (SIGTERM to its main thread) when
    # the pilot fails; asyncflow fails the pilot's tasks instead
    pd["exit_on_error"] = False
    pd.update(cfg)  # the remaining native keys pass through
    allocation = None
    if resource == SLURM:
        allocation = batch.allocation(pd, site.cores_per_node)
        pd["resource"] = batch.RP_RESOURCE
    _verify(pd)
    mpi = not site.local or bool(shutil.which("mpiexec") or shutil.which("mpirun"))
    return Layout(
        pd,
        resource,
        site.local,
        max(raptor.task_cores, 0),
        cap.node_cores,
        cap.gpus,
        mem_total,
        raptor.function_cores,
        raptor.worker_cores,
        raptor.n_workers,
        mpi,
        allocation,
    )


def _time_and_account(resource: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """The PilotDescription's first keys; the page's walltime may be a float,
    radical.pilot's runtime is whole minutes."""
    pd: dict[str, Any] = {"resource": resource}
    walltime = cfg.pop("walltime", cfg.pop("runtime", DEFAULT_WALLTIME))
    pd["runtime"] = positive_int(
        "walltime", math.ceil(walltime) if isinstance(walltime, float) else walltime
    )
    project = cfg.pop("account", cfg.pop("project", None))
    if project is not None:
        pd["project"] = str(project)
    return pd


def _size(cap: Capacity, raptor: Raptor) -> dict[str, Any]:
    """Cores (raptor's included) where the dict counts cores, else whole nodes."""
    if not cap.by_cores:
        return {"nodes": cap.nodes}
    size = {"cores": raptor.pilot_cores}
    if cap.gpus:
        size["gpus"] = cap.gpus
    return size


def _memory(
    cfg: dict[str, Any], site: Site, nodes: int
) -> tuple[int | None, int | None]:
    """Pop ``memory``: what the PilotDescription asks for, and the pilot's
    memory in MB as far as known (the nodes' where none is asked for)."""
    memory = cfg.pop("memory", None)
    if memory is not None:
        memory = positive_int("memory", memory)
        return memory, memory
    mem_node = site.mem_per_node
    return None, (mem_node * nodes if mem_node else None)


def _verify(pd: dict[str, Any]) -> None:
    """radical.pilot's own check, before anything starts."""
    try:
        rp.PilotDescription(dict(pd)).verify()
    except Exception as exc:
        raise TaskDefinitionError(
            f"RadicalExecutionBackend: radical.pilot rejects the pilot {pd}: {exc}"
        ) from None


def _checked(resources: Mapping[str, Any] | None) -> dict[str, Any]:
    """The dict's keys, checked: unknown ones and synonyms given twice fail."""
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
    return cfg


def _site(resource: str, cfg: Mapping[str, Any]) -> Site:
    """The resource's nodes: from radical.pilot's config, or for ``'slurm'``
    (which has none) from the dict, and else from ``sinfo``."""
    if resource == SLURM:
        cpn = cfg.get("cores_per_node")
        cores = (
            positive_int("cores_per_node", cpn)
            if cpn is not None
            else batch.sinfo_cores_per_node(cfg.get("queue"))
        )
        return Site(cores, 0, 0, fake=False, local=False)
    rcfg = _resource_config(resource)
    return Site(
        int(rcfg.get("cores_per_node") or 0),
        int(rcfg.get("gpus_per_node") or 0),
        int(rcfg.get("mem_per_node") or 0),
        fake=bool(rcfg.get("fake_resources")),
        local=resource.startswith("local."),
    )


_ENV_LOCK = threading.Lock()


@contextlib.contextmanager
def spawn_environment(
    base: str, extra: Mapping[str, str] | None = None
) -> Iterator[None]:
    """The environment radical.pilot's client processes must be spawned with.

    radical.pilot passes them no environment of its own, so the variables it
    needs (PATH and VIRTUAL_ENV for the agent, RADICAL_PROFILE and RADICAL_REPORT
    off, TMPDIR and RADICAL_BASE under the runtime's temp directory, and the
    ``extra`` ones of a Slurm pilot) are set only while those processes are
    spawned, then restored: the user's process keeps its own.  Serialised,
    because two runtimes may start at once.
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
    want.update(extra or {})
    with _ENV_LOCK, batch.advertised_interface(want.get("RADICAL_DEFAULT_IFACE")):
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
