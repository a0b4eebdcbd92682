"""Task resources mapped onto Dask worker resources.

``cores`` become ``CPU`` when the workers advertise it, else a thread count;
``gpus`` become ``GPU``; ``memory`` becomes ``MEMORY`` or the worker's memory
limit.  The cached list of workers decides at once whether any could ever run a
task: a request none can meet fails instead of waiting in the scheduler forever,
and one the cache cannot meet is checked again against a fresh list first.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence

from ...errors import ResourceUnavailableError
from ...spec import Resources, TaskSpec
from .state import DaskState, WorkerCapacity
from .values import MB


class StaleWorkers(Exception):
    """The cached worker list cannot meet a request; refresh and ask again."""


def _describe(res: Resources) -> str:
    parts = [f"cores={res.cores}"]
    if res.gpus:
        parts.append(f"gpus={res.gpus}")
    if res.memory:
        parts.append(f"memory={res.memory} MB")
    return ", ".join(parts)


def _wanted(res: Resources, workers: Sequence[WorkerCapacity]) -> dict[str, float]:
    """Dask resources to ask for.  Cores and memory only where some worker
    declares them: Dask would hold a task forever on resources no worker has,
    and :func:`_fits` checks threads and memory limits instead.  GPUs always:
    only a worker declaring them may run a GPU task."""
    want: dict[str, float] = {}
    if any("CPU" in w.resources for w in workers):
        want["CPU"] = res.cores
    if res.gpus:
        want["GPU"] = res.gpus
    if res.memory and any("MEMORY" in w.resources for w in workers):
        want["MEMORY"] = res.memory * MB
    return want


def _fits(w: WorkerCapacity, want: dict[str, float], res: Resources) -> bool:
    return (
        all(w.resources.get(k, 0) >= v for k, v in want.items())
        and ("CPU" in want or w.nthreads >= res.cores)
        and (
            "MEMORY" in want
            or not res.memory
            or not w.memory_limit
            or w.memory_limit >= res.memory * MB
        )
    )


class ResourceChecker:
    """The worker list, and matching requests against it."""

    def __init__(self, state: DaskState):
        self._state = state
        self._refreshing: asyncio.Future[None] | None = None

    async def refresh(self) -> None:
        """Replace the cached workers by the scheduler's: the cache is what
        requests are checked against, and ``info`` counts its threads."""
        state = self._state
        client = state.client
        assert client is not None
        ident = await client.scheduler.identity(n_workers=-1)
        state.workers = [WorkerCapacity(w) for w in ident.get("workers", {}).values()]
        state.refresh_info()

    async def refresh_shared(self) -> None:
        """One refresh for every caller waiting on one; its failure is theirs
        to ignore (the cached list stands)."""
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.ensure_future(self.refresh())
        with contextlib.suppress(Exception):
            await asyncio.shield(self._refreshing)

    def dask_resources(
        self, spec: TaskSpec, final: bool = False
    ) -> dict[str, float] | None:
        """Dask resources for ``spec``; raises if no worker could ever run it.

        Raises ``StaleWorkers`` when the cached worker list says no but a fresh
        one might say yes (``final`` is False), so the caller refreshes first.
        """
        res = spec.resources
        if res.ranks > 1:
            raise ResourceUnavailableError(
                f"task {spec.name!r} asks for {res.ranks} MPI ranks, but the Dask "
                "backend has no MPI launcher; use a backend with MPI support"
            )
        # Before an allocation's workers connect, check against those it brings.
        workers = self._state.workers or self._state.planned
        want = _wanted(res, workers)
        if not workers:
            return want or None  # nobody to ask yet (an adaptive cluster scaling up)
        if any(_fits(w, want, res) for w in workers):
            return want or None
        if not final:
            raise StaleWorkers
        raise self._unavailable(spec, workers)

    def _unavailable(
        self, spec: TaskSpec, workers: list[WorkerCapacity]
    ) -> ResourceUnavailableError:
        res = spec.resources
        best = max(workers, key=lambda w: (w.nthreads, w.memory_limit))
        limit = (
            f"{best.memory_limit // MB} MB memory limit"
            if best.memory_limit
            else "no memory limit"
        )
        return ResourceUnavailableError(
            f"task {spec.name!r} asks for {_describe(res)}, but no Dask worker can "
            f"ever provide it ({len(workers)} worker(s); the largest has "
            f"{best.nthreads} thread(s), {limit}, resources "
            f"{best.resources or '{}'}); {self._fit_hint(res)}"
        )

    def _fit_hint(self, res: Resources) -> str:
        plan = self._state.settings.plan
        if plan is None:
            return (
                "lower the request, or start workers with more --nthreads / "
                '--resources (e.g. "CPU=4 GPU=1")'
            )
        if res.gpus and not plan.alloc.gpus_per_node:
            return "the allocation has no GPUs: add 'gpus_per_node' to the dict"
        return (
            "lower the request, or ask the dict for bigger workers: "
            "'processes_per_node' (fewer workers, more cores each), "
            "'cores_per_node', 'gpus_per_node', 'memory_per_node'"
        )
