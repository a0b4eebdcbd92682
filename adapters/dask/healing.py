"""An owned LocalCluster keeps the workers it was asked for.

A nanny restarts its worker when the worker process dies.  But
``SpecCluster`` also closes, for good, the nanny of any worker that is missing
from the scheduler ``distributed.deploy.lost-worker-timeout`` (15 s) after *a*
removal: one look at one instant.  Workers that die often (memory pressure, a
flaky node, a chaos test) are caught restarting sooner or later, and the
cluster then runs fewer workers than its spec names, down to none.  Dask waits
for workers to arrive, so every task would stay pending.

:class:`KeepWorkers` is a scheduler plugin on the owned cluster's in-process
scheduler.  After each removal, once that timeout has passed, it asks the
cluster to run its spec again (``scale`` to the spec's own size), which starts
only the nannies that are missing.  It owns no thread and polls nothing: it
acts on the scheduler's own removal events.
"""

from __future__ import annotations

import asyncio
from typing import Any

import dask
from dask.utils import parse_timedelta
from distributed.core import Status
from distributed.diagnostics.plugin import SchedulerPlugin

__all__ = ["KeepWorkers"]

#: after Dask's own lost-worker timeout, so that its closing is seen
MARGIN = 1.0


class KeepWorkers(SchedulerPlugin):
    name = "asyncflow-keep-workers"

    def __init__(self, cluster: Any):
        self._cluster = cluster
        self._handle: asyncio.TimerHandle | None = None

    def remove_worker(self, scheduler: Any, worker: str, **kwargs: Any) -> None:
        if self._handle is not None:
            self._handle.cancel()
        timeout = parse_timedelta(
            dask.config.get("distributed.deploy.lost-worker-timeout")
        )
        loop = asyncio.get_running_loop()
        self._handle = loop.call_later(timeout + MARGIN, self._heal)

    def _heal(self) -> None:
        self._handle = None
        cluster = self._cluster
        if cluster.status != Status.running:
            return
        if len(cluster.workers) < len(cluster.worker_spec):
            cluster.scale(len(cluster.worker_spec))
            # a removal during the restart schedules the next look
            self.remove_worker(None, "")

    async def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
