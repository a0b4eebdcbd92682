"""The state every part of :class:`DaskExecutionBackend` shares.

The backend is one class assembled from mixins, one per job (submit, resources,
results), so that no module holds the whole adapter.  They all read and write the
same bookkeeping; declaring it once here, with its types, keeps the mixins honest
under mypy and gives one place to read what the backend tracks.  The attributes
are set in ``DaskExecutionBackend.__init__``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine, Sequence
from typing import TYPE_CHECKING, Any

from distributed import Client, Future

from ...protocol import BackendInfo, CompletionSink
from ...spec import TaskSpec

if TYPE_CHECKING:
    from ...slurm import BatchJobs
    from .slurm import SlurmPlan

log = logging.getLogger("asyncflow.dask")


class _Worker:
    __slots__ = ("memory_limit", "nthreads", "resources")

    def __init__(self, info: dict[str, Any]):
        self.nthreads: int = info.get("nthreads") or 1
        self.memory_limit: int = info.get("memory_limit") or 0  # 0: no limit
        self.resources: dict[str, float] = dict(info.get("resources") or {})


class _Tracked:
    __slots__ = ("future", "is_command", "key", "name", "watcher")

    def __init__(
        self,
        future: Future,
        key: str,
        is_command: bool,
        watcher: asyncio.Task[None],
        name: str,
    ):
        self.future = future
        self.key = key
        self.is_command = is_command
        self.watcher = watcher
        self.name = name  # for errors about a task that never reported


class _DaskBase:
    """Attributes and helpers shared by the backend's mixins."""

    _owns_cluster: bool
    _cluster_options: dict[str, Any]
    _client_options: dict[str, Any]
    _user_options: dict[str, Any]
    _target: Any
    _cluster: Any
    _client: Client | None
    _sink: CompletionSink | None
    _loop: asyncio.AbstractEventLoop | None
    _started: bool
    _closed: bool
    _token: str
    _tasks: dict[str, _Tracked]
    _keys: set[str]
    _pushed: dict[str, bytes]
    _pickled: dict[Any, bytes]
    _deferred: set[str]
    _consumed: set[str]
    _topic: str | None
    _background: set[asyncio.Task[Any]]
    _stops: set[asyncio.Task[Any]]
    _cancel_queue: list[tuple[str, _Tracked]]
    _fetch_queue: list[tuple[Future, asyncio.Future[Any]]]
    _fetch_scheduled: bool
    _gathering: int
    _workers: list[_Worker]
    _refreshing: asyncio.Future[None] | None
    _processes: bool
    _info: BackendInfo
    _scratch: str | None  # a temp dir shutdown removes
    # An allocation from the page's HPC dict (see ``allocation``), else None/empty
    _plan: SlurmPlan | None
    _jobs: BatchJobs | None
    _planned: list[_Worker]  # the workers the allocation will bring
    _job_ended: asyncio.Event | None
    _jobs_gone: set[str]
    _dead: str | None  # why every job of the allocation is gone

    if TYPE_CHECKING:
        # Defined by DaskExecutionBackend and its mixins; declared here so that
        # each mixin type-checks as the backend it is part of: an ExecutionBackend
        # (the owner of the remote values it makes) calling the others' methods.
        @property
        def info(self) -> BackendInfo: ...
        async def start(self, sink: CompletionSink) -> None: ...
        def submit(self, specs: Sequence[TaskSpec]) -> None: ...
        def cancel(self, uids: Sequence[str]) -> None: ...
        async def shutdown(self) -> None: ...
        def _make_info(self) -> BackendInfo: ...
        async def _why_lost(self) -> None: ...

    # -- helpers -------------------------------------------------------------------
    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        assert self._loop is not None
        task = self._loop.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background_done)
        return task

    def _background_done(self, task: asyncio.Task[Any]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("dask adapter: background job failed", exc_info=task.exception())
