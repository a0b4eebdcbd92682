"""The state every part of :class:`RayExecutionBackend` shares.

The backend is one class assembled from mixins, one per job (process lifecycle,
submit, results), so that no module holds the whole adapter.  They all read and
write the same bookkeeping; declaring it once here, with its types, keeps the
mixins honest under mypy and gives one place to read what the backend tracks.
The attributes are set in ``RayExecutionBackend.__init__``.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import threading
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import ray

from ...protocol import BackendInfo, CompletionSink
from ...spec import TaskSpec

log = logging.getLogger("asyncflow.ray")


class _Task:
    __slots__ = ("command", "name", "ref", "upstreams")

    def __init__(
        self,
        name: str,
        ref: ray.ObjectRef,
        command: bool,
        upstreams: frozenset[str] = frozenset(),
    ):
        self.name = name
        self.ref = ref
        self.command = command
        self.upstreams = upstreams  # piped: the uids of tasks it waits for


class _RayBase:
    """Attributes and helpers shared by the backend's mixins."""

    _address: str | None
    _init_kwargs: dict[str, Any]
    _fail_infeasible: bool
    _loopback: bool
    _token: str
    _sink: CompletionSink | None
    _loop: asyncio.AbstractEventLoop | None
    _tasks: dict[str, _Task]
    _cancelled: dict[str, ray.ObjectRef]
    _ready_uids: collections.deque[str]
    _drain_scheduled: bool
    _deferred: bool
    _backlog: int
    _client: bool
    _runners: dict[Any, Any]
    _by_id: dict[int, tuple[Any, Any]]
    _variants: dict[Any, Any]
    _nodes: list[Mapping[str, float]]
    _fetches: list[tuple[ray.ObjectRef, asyncio.Future[Any]]]
    _jobs: set[asyncio.Task[Any]]
    _up: concurrent.futures.Future[None] | None
    _stopped: concurrent.futures.Future[None]
    _stop: threading.Event
    _thread: threading.Thread | None
    _owns: bool
    _connected: bool
    _tmpdir: str | None
    _env_saved: dict[str, str | None]
    _closed: bool
    _lost: str | None
    _info: BackendInfo

    if TYPE_CHECKING:
        # Defined by RayExecutionBackend and its mixins; declared here so that
        # each mixin type-checks as the backend it is part of: an ExecutionBackend
        # (the owner of the remote values it makes) calling the others' methods.
        @property
        def info(self) -> BackendInfo: ...
        async def start(self, sink: CompletionSink) -> None: ...
        def submit(self, specs: Sequence[TaskSpec]) -> None: ...
        def cancel(self, uids: Sequence[str]) -> None: ...
        async def shutdown(self) -> None: ...
        def _info_from_cluster(self) -> BackendInfo: ...

    def _spawn(self, coro: Any) -> None:
        job = asyncio.ensure_future(coro)
        self._jobs.add(job)
        job.add_done_callback(self._jobs.discard)
