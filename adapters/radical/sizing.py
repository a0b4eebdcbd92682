"""How big the pilot is, and how raptor and executables share its cores.

The dict gives a size either in cores (``cores``, ``gpus``) or in nodes
(``nodes`` x ``cores_per_node``, ``gpus_per_node``), and the resource's config
fills in what it leaves out.  Function tasks need a raptor master and worker
slots out of the same cores; :func:`raptor_share` works out how many, so that
the backend can refuse an oversized task without a round trip to the pilot.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ...errors import TaskDefinitionError

DEFAULT_LOCAL_CORES = 2


@dataclass(frozen=True)
class Site:
    """What is known of the resource's nodes before anything starts."""

    cores_per_node: int  # 0: unknown
    gpus_per_node: int
    mem_per_node: int
    fake: bool  # radical.pilot pretends the node (local.localhost)
    local: bool


@dataclass(frozen=True)
class Capacity:
    """The pilot's size as the dict asks for it."""

    nodes: int
    node_cores: int  # 0: unknown
    total: int  # cores; 0: unknown (radical.pilot counts whole nodes)
    gpus: int
    by_cores: bool  # described by cores (not whole nodes) in the PilotDescription


@dataclass(frozen=True)
class Raptor:
    """How the pilot's cores are shared between raptor and executables."""

    function_cores: int
    worker_cores: int
    n_workers: int
    pilot_cores: int
    task_cores: int


@dataclass(frozen=True)
class _Asked:
    """The size keys as the dict gives them, unchecked; None where absent."""

    nodes: Any
    cores_per_node: Any
    gpus_per_node: Any
    cores: Any
    gpus: Any


def positive_int(key: str, value: Any, zero_ok: bool = False) -> int:
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


def capacity(cfg: dict[str, Any], site: Site) -> Capacity:
    """Pop the size keys: ``cores``/``gpus`` or ``nodes`` x ``*_per_node``."""
    asked = _Asked(
        cfg.pop("nodes", None),
        cfg.pop("cores_per_node", None),
        cfg.pop("gpus_per_node", None),
        cfg.pop("cores", None),
        cfg.pop("gpus", None),
    )
    _one_way(asked)
    cpn = asked.cores_per_node
    n_nodes = positive_int("nodes", asked.nodes) if asked.nodes is not None else 1
    node_cores = (
        positive_int("cores_per_node", cpn) if cpn is not None else site.cores_per_node
    )
    total = _total_cores(asked, n_nodes, node_cores, site)
    n_gpus = _gpus(asked, n_nodes, site)
    by_cores = bool(total) or asked.cores is not None or cpn is not None
    return Capacity(n_nodes, node_cores, total, n_gpus, by_cores)


def _one_way(asked: _Asked) -> None:
    """A size in cores and one in nodes could disagree: only one is taken."""
    if asked.cores is not None and (
        asked.nodes is not None or asked.cores_per_node is not None
    ):
        raise TaskDefinitionError(
            "RadicalExecutionBackend: give either 'cores' or 'nodes'/"
            "'cores_per_node', not both"
        )
    if asked.gpus is not None and asked.gpus_per_node is not None:
        raise TaskDefinitionError(
            "RadicalExecutionBackend: give either 'gpus' or 'gpus_per_node'"
        )


def _total_cores(asked: _Asked, n_nodes: int, node_cores: int, site: Site) -> int:
    if asked.cores is not None:
        return positive_int("cores", asked.cores)
    if asked.nodes is None and asked.cores_per_node is None and site.local:
        return DEFAULT_LOCAL_CORES
    if node_cores:
        return n_nodes * node_cores
    return 0  # radical.pilot counts whole nodes; capacity unknown here


def _gpus(asked: _Asked, n_nodes: int, site: Site) -> int:
    gpn = asked.gpus_per_node
    if gpn is not None:
        return n_nodes * positive_int("gpus_per_node", gpn, zero_ok=True)
    if asked.gpus is not None:
        return positive_int("gpus", asked.gpus, zero_ok=True)
    if asked.nodes is not None and asked.cores_per_node is None and asked.cores is None:
        return n_nodes * site.gpus_per_node  # whole nodes come with their GPUs
    return 0


def raptor_share(cap: Capacity, site: Site, function_cores: int | None) -> Raptor:
    """One raptor master core plus the worker slots, and what is left.

    Where radical.pilot fakes the node (local.localhost), raptor comes on top
    of the task cores; on a real machine it is carved out of the pilot, and
    must leave executables at least one core: radical.pilot would otherwise
    queue them for ever (a 1-node, 2-core pilot hung that way).
    """
    total, node_cores = cap.total, cap.node_cores
    fn_cores = _function_cores(cap, site, function_cores)
    worker_cores = min(fn_cores, node_cores) if node_cores else fn_cores
    n_workers = math.ceil(fn_cores / worker_cores) if fn_cores else 0
    raptor = (1 + fn_cores) if fn_cores else 0
    if site.fake:
        return Raptor(fn_cores, worker_cores, n_workers, total + raptor, total)
    if total and total - raptor < 1:
        raise _no_room(cap, fn_cores, raptor)
    return Raptor(fn_cores, worker_cores, n_workers, total, total - raptor)


def _function_cores(cap: Capacity, site: Site, function_cores: int | None) -> int:
    """Worker slots for function tasks: as asked, else half a real node (all
    of a pretended one); one at least where the pilot's size is unknown."""
    total, node_cores = cap.total, cap.node_cores
    if function_cores is None:
        fn_cores = total if site.fake else max(1, min(node_cores or total, total // 2))
    else:
        fn_cores = positive_int("function_cores", function_cores, zero_ok=True)
    if not total and fn_cores:
        fn_cores = 1
    return fn_cores


def _no_room(cap: Capacity, fn_cores: int, raptor: int) -> TaskDefinitionError:
    total, node_cores = cap.total, cap.node_cores
    shape = f"{cap.nodes} node(s) x {node_cores}" if node_cores else "cores"
    return TaskDefinitionError(
        f"RadicalExecutionBackend: the pilot has {total} core(s) ({shape}) "
        f"and function tasks would take {raptor} of them (a raptor master and "
        f"{fn_cores} worker slot(s)), leaving no core for executable tasks, "
        "which would wait for ever; pass function_cores=0 to run executables "
        f"only, or ask for more (e.g. 'nodes': {cap.nodes + 1})"
    )
