"""The state every part of :class:`ParslExecutionBackend` shares.

The backend is one class assembled from mixins, one per job (submit, results),
so that no module holds the whole adapter.  They all read and write the same
bookkeeping; declaring it once here, with its types, keeps the mixins honest
under mypy and gives one place to read what the backend tracks.  The attributes
are set in ``ParslExecutionBackend.__init__``.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from typing import TYPE_CHECKING, Any

from parsl.dataflow.dflow import DataFlowKernel

from ...errors import WorkerLostError
from ...protocol import BackendInfo, CompletionSink

if TYPE_CHECKING:
    from .executors import _Profile
    from .runtime import _Runtime

log = logging.getLogger("asyncflow.parsl")


class _InterchangeLost(WorkerLostError):
    """An HTEX executor can run no more tasks (set as its bad state): its
    interchange exited, or the batch job holding its workers ended."""


class _Task:
    __slots__ = ("command", "key", "label", "name", "packed")

    def __init__(self, name: str, key: str, command: bool, label: str, packed: bool):
        self.name = name
        self.key = key
        self.command = command
        self.label = label
        self.packed = packed  # the result comes back pickled (see _run_packed)


class _ParslBase:
    """Attributes and helpers shared by the backend's mixins."""

    _runtime: _Runtime
    _profiles: dict[str, _Profile]
    _label: str
    _routable: bool
    _kill_functions: bool
    _token: str
    _counter: itertools.count[int]
    _tasks: dict[str, _Task]
    _cancelled: dict[str, _Task]  # until Parsl reports them done
    _pickled: dict[Any, bytes]
    _sink: CompletionSink | None
    _dfk: DataFlowKernel | None
    _start_job: asyncio.Future[None] | None
    _watch: asyncio.TimerHandle | None
    _started: bool
    _closed: bool
    _info: BackendInfo

    if TYPE_CHECKING:
        # Defined by ParslExecutionBackend; declared here so that the results
        # mixin type-checks as the backend it is part of.
        def _forget(self, uid: str) -> None: ...
