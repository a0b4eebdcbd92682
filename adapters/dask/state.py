"""The bookkeeping the parts of the Dask adapter share, in one object.

Submission, completions, cancellation and the Slurm allocation each read and
write the same few things: the client, the sink, the Dask futures being
watched.  Holding them in one :class:`DaskState`, owned by the backend and
handed to each collaborator, keeps the sharing explicit: a reader sees every
field the adapter tracks in one place, and no part reaches into another.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from distributed import Client, Future

from ...protocol import BackendInfo, CompletionSink, ExecutionBackend
from ..toolkit import Lifecycle, Scratch

if TYPE_CHECKING:
    from .config import Settings

log = logging.getLogger("asyncflow.dask")


class WorkerCapacity:
    """What one Dask worker offers, from the scheduler's identity message."""

    __slots__ = ("memory_limit", "nthreads", "resources")

    def __init__(self, info: dict[str, Any]):
        self.nthreads: int = info.get("nthreads") or 1
        self.memory_limit: int = info.get("memory_limit") or 0  # 0: no limit
        self.resources: dict[str, float] = dict(info.get("resources") or {})


class Tracked:
    """A submitted task: its Dask future and the coroutine watching it."""

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


@dataclass(eq=False)
class DaskState:
    """One backend's shared bookkeeping, from construction to shutdown."""

    settings: Settings
    #: the backend: the owner the engine sees on the remote values made here
    owner: ExecutionBackend
    life: Lifecycle
    info: BackendInfo
    #: part of every Dask key, so that backends sharing a scheduler never clash
    token: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    client: Client | None = None
    cluster: Any = None  # the cluster this backend owns, if any
    sink: CompletionSink | None = None
    topic: str | None = None  # where workers publish small results
    tasks: dict[str, Tracked] = field(default_factory=dict)
    keys: set[str] = field(default_factory=set)  # Dask keys of ``tasks``
    pushed: dict[str, bytes] = field(default_factory=dict)  # key -> small result
    deferred: set[str] = field(default_factory=set)  # awaiting refresh or scatter
    workers: list[WorkerCapacity] = field(default_factory=list)
    planned: list[WorkerCapacity] = field(default_factory=list)  # an allocation's
    dead: str | None = None  # why every job of the allocation is gone
    #: told why when an allocation's job ends, for work ``tasks`` does not list
    #: (the chunks in flight)
    lost_hooks: list[Callable[[str], None]] = field(default_factory=list)
    #: a temp dir shutdown removes (worker scratch space, or Slurm job logs)
    scratch: Scratch = field(default_factory=Scratch)

    def refresh_info(self) -> None:
        """Re-derive ``info`` after the known or planned workers changed."""
        self.info = self.settings.describe(self.workers or self.planned)

    def forget(self, uid: str) -> Tracked | None:
        """Stop tracking ``uid``; its entry, if it was still tracked."""
        tracked = self.tasks.pop(uid, None)
        if tracked is not None:
            self.keys.discard(tracked.key)
        return tracked
