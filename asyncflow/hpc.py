"""One HPC allocation, described once, for every batch-capable runtime.

The reference page describes a pilot job in batch-system terms::

    {'resource': 'slurm', 'queue': 'normal', 'nodes': 4, 'cores_per_node': 56,
     'gpus_per_node': 0, 'walltime': 240, 'account': 'abc123'}

and the promise is that switching runtime on a cluster stays a one-line change,
so radical.pilot, Parsl and Dask take the same dict.  :class:`Allocation` is that
dict checked once (a typo fails in the constructor, not in a batch job an hour
later); each adapter turns it into its runtime's own object: a PilotDescription,
a Parsl ``SlurmProvider``, a dask-jobqueue ``SLURMCluster``.

What every runtime needs from the batch system itself (a preflight, the
driver's address, watching and cancelling jobs) is in :mod:`asyncflow.slurm`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import TaskDefinitionError

__all__ = ["PAGE_KEYS", "SLURM", "Allocation", "is_allocation"]

#: ``'resource': 'slurm'``: the Slurm cluster this machine submits to
SLURM = "slurm"
#: the reference page's keys, the same for every runtime
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
DEFAULT_WALLTIME = 60  # minutes


def is_allocation(obj: object) -> bool:
    """A plain dict in the page's terms (as opposed to a runtime's own object)."""
    return isinstance(obj, Mapping) and "resource" in obj


def _whole(who: str, key: str, value: Any, minimum: int = 1) -> int:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or value != int(value)
        or value < minimum
    ):
        raise TaskDefinitionError(
            f"{who}: {key!r} must be a whole number >= {minimum}, got {value!r}"
        )
    return int(value)


def _check_keys(cfg: Mapping[str, Any], who: str, extra: frozenset[str]) -> None:
    unknown = set(cfg) - PAGE_KEYS - extra
    if unknown:
        raise TaskDefinitionError(
            f"{who}: unknown key(s) {sorted(unknown)}; valid keys are "
            f"{sorted(PAGE_KEYS | extra)}"
        )
    if "account" in cfg and "project" in cfg and cfg["account"] != cfg["project"]:
        raise TaskDefinitionError(
            f"{who}: 'account' and 'project' mean the same thing; give only one"
        )


def _names(cfg: dict[str, Any], who: str) -> tuple[str, str | None]:
    """Pop and check the ``resource`` and ``queue`` names."""
    resource = cfg.pop("resource")
    if not isinstance(resource, str) or not resource:
        raise TaskDefinitionError(
            f"{who}: 'resource' must be a name such as 'slurm', got {resource!r}"
        )
    queue = cfg.pop("queue", None)
    if queue is not None and not isinstance(queue, str):
        raise TaskDefinitionError(f"{who}: 'queue' must be a str, got {queue!r}")
    return resource, queue


def _minutes(walltime: Any) -> Any:
    """A fractional walltime rounds up, so a job is never given less than asked;
    anything else is left for ``_whole`` to check."""
    if isinstance(walltime, float) and walltime > 0:
        return math.ceil(walltime)
    return walltime


@dataclass(frozen=True)
class Allocation:
    """The page's dict, checked.  ``walltime`` is in minutes, as on the page."""

    resource: str
    queue: str | None = None
    nodes: int = 1
    cores_per_node: int | None = None
    gpus_per_node: int = 0
    walltime: int = DEFAULT_WALLTIME
    account: str | None = None

    @classmethod
    def from_mapping(
        cls, spec: Mapping[str, Any], who: str, extra: frozenset[str] = frozenset()
    ) -> tuple[Allocation, dict[str, Any]]:
        """Check ``spec``; returns the allocation and the runtime-specific rest.

        ``extra`` names the keys the calling runtime takes besides the page's;
        any other key is an error listing the valid ones.
        """
        cfg = dict(spec)
        _check_keys(cfg, who, extra)
        resource, queue = _names(cfg, who)
        walltime = _minutes(cfg.pop("walltime", DEFAULT_WALLTIME))
        cpn = cfg.pop("cores_per_node", None)
        account = cfg.pop("account", cfg.pop("project", None))
        alloc = cls(
            resource=resource,
            queue=queue,
            nodes=_whole(who, "nodes", cfg.pop("nodes", 1)),
            cores_per_node=None if cpn is None else _whole(who, "cores_per_node", cpn),
            gpus_per_node=_whole(who, "gpus_per_node", cfg.pop("gpus_per_node", 0), 0),
            walltime=_whole(who, "walltime", walltime),
            account=None if account is None else str(account),
        )
        return alloc, cfg

    @property
    def walltime_hms(self) -> str:
        """``walltime`` as Slurm's ``HH:MM:SS``."""
        hours, minutes = divmod(self.walltime, 60)
        return f"{hours:02d}:{minutes:02d}:00"

    def sbatch_options(self) -> list[str]:
        """The ``sbatch`` options this allocation asks for, per job of ``nodes``."""
        opts = [f"--nodes={self.nodes}", f"--time={self.walltime}"]
        if self.queue:
            opts.append(f"--partition={self.queue}")
        if self.account:
            opts.append(f"--account={self.account}")
        if self.cores_per_node:
            opts.append(f"--ntasks-per-node={self.cores_per_node}")
        if self.gpus_per_node:
            opts.append(f"--gres=gpu:{self.gpus_per_node}")
        return opts

    def require(self, who: str, *resources: str) -> None:
        """Refuse a ``resource`` this runtime cannot reach with the dict alone."""
        if self.resource not in resources:
            raise TaskDefinitionError(
                f"{who}: resource {self.resource!r} is not a batch system it can "
                f"submit to from this dict (it knows {', '.join(map(repr, resources))})"
                "; for another site pass the runtime's own configuration object"
            )
