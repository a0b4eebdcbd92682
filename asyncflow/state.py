"""What the engine's collaborators share: one explicit state object.

The engine is split by job (:mod:`~asyncflow.scheduler` for the DAG,
:mod:`~asyncflow.dispatch` for handing work to backends, :mod:`~asyncflow.sink`
for reports coming back, :mod:`~asyncflow.services` for long-running tasks).
They read and write the same few tables; keeping those here, typed and in one
place, is what lets each part stay small without reaching into another's
private fields.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from .events import EventKind, Subscriber, TaskEvent

if TYPE_CHECKING:
    from .caching import Caching
    from .data import FileLinks
    from .future import TaskFuture
    from .protocol import ExecutionBackend
    from .services import Services
    from .spec import TaskSpec

__all__ = ["EngineState", "EventHub"]

log = logging.getLogger("asyncflow")


class EventHub:
    """The engine's observers, and the label each backend is shown under.

    Every caller tests ``hub.subscribers`` before building an event, so a run
    nobody watches pays one truth test per transition."""

    __slots__ = ("labels", "subscribers")

    def __init__(self, labels: dict[int, str]):
        self.labels = labels
        self.subscribers: list[Subscriber] = []

    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        self.subscribers.append(callback)

        def unsubscribe() -> None:
            if callback in self.subscribers:
                self.subscribers.remove(callback)

        return unsubscribe

    def label(self, backend: object, default: str = "engine") -> str:
        return self.labels.get(id(backend), default)

    def task(
        self,
        kind: EventKind,
        fut: TaskFuture,
        deps: tuple[str, ...] = (),
        error: BaseException | None = None,
    ) -> None:
        """``error``, a failure's exception, goes out as the event's ``detail``."""
        backend = fut._backend or fut._decl.backend
        label = self.labels.get(id(backend), "engine") if backend else "engine"
        detail = "" if error is None else f"{type(error).__name__}: {error}"
        self.publish(
            TaskEvent(
                time.time(), kind, fut.uid, fut.name, label, fut._attempt, deps, detail
            )
        )

    def ran(self, fut: TaskFuture, start: float, end: float, worker: str) -> None:
        """The RUNNING event of a task whose run was measured where it ran."""
        backend = fut._backend
        self.publish(
            TaskEvent(
                start,
                EventKind.RUNNING,
                fut.uid,
                fut.name,
                self.labels.get(id(backend), "engine"),
                fut._attempt,
                until=end,
                worker=worker,
            )
        )

    def backend_state(self, backend: object, state: str, detail: str) -> None:
        label = self.labels.get(id(backend), "engine")
        self.publish(
            TaskEvent(time.time(), EventKind.BACKEND, "", state, label, 0, (), detail)
        )

    def publish(self, event: TaskEvent) -> None:
        for callback in list(self.subscribers):
            try:
                callback(event)
            except Exception:
                log.exception("event subscriber %r failed", callback)


class EngineState:
    """The tables every part of one engine reads and writes."""

    __slots__ = (
        "caching",
        "chunking",
        "closed",
        "files",
        "hub",
        "inflight",
        "loop",
        "open",
        "queues",
        "services",
        "started",
    )

    def __init__(self, hub: EventHub, files: FileLinks | None):
        self.hub = hub
        self.files = files  # None: implicit_data=False
        self.loop: asyncio.AbstractEventLoop | None = None
        self.closed = False
        #: the engine's ``chunking=``: False keeps every task out of chunks
        self.chunking = True
        #: the result store's side (``store=``), or None: nothing is looked up
        self.caching: Caching | None = None
        #: spec uid -> future, for every spec a backend holds or is about to
        self.inflight: dict[str, TaskFuture] = {}
        #: task uid -> future, for every unfinished task
        self.open: dict[str, TaskFuture] = {}
        #: per backend (by id): specs waiting for this loop turn's submit()
        self.queues: dict[int, list[TaskSpec]] = {}
        #: the backends whose start() returned, by id
        self.started: dict[int, ExecutionBackend] = {}
        self.services: Services  # set by the engine, which builds it on this
