"""Service tasks: long-running work that others depend on once it is up.

``@flow.executable_task(service=True)`` (or a function task) declares a task
that is not expected to end: a database, a model server, a broker.  Its future
resolves to a :class:`Service` as soon as the service is *up*, so tasks that
take it as an argument start then, while it keeps running until the engine
shuts down and stops it.

What *up* means depends on what the runtime can tell: on a backend that
declares ``Capability.REPORTS_RUNNING`` (the thread pool) it is the moment the
runtime starts the task on a worker; on the others (process pools, Dask, Ray,
Parsl, radical.pilot) it is the moment the runtime accepts it.  Neither says
that the service is ready to answer, so a client still retries its first
connection, as it would with any service.  ``timeout=`` limits how long a
service may take to come up.  A service that fails before it is up fails its
future (and its dependents) like any task; one that ends after is logged.

Stopping a service means stopping a running task, so a function service needs
a backend that can (``CANCEL_RUNNING``) and an executable service one that
kills commands (``KILL_EXECUTABLES``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .future import LIVE
from .protocol import Capability, ExecutionBackend

if TYPE_CHECKING:
    from .future import TaskFuture
    from .scheduler import Scheduler
    from .spec import TaskSpec
    from .state import EngineState

__all__ = ["Service", "Services"]

log = logging.getLogger("asyncflow")


@dataclass(frozen=True, slots=True)
class Service:
    """What a service task's future holds once the service is up."""

    uid: str
    name: str
    backend: str


class Services:
    """One engine's service tasks, by the uid of the spec that runs each."""

    def __init__(self, state: EngineState, scheduler: Scheduler) -> None:
        self._state = state
        self._scheduler = scheduler
        self.live: dict[str, tuple[TaskFuture, ExecutionBackend]] = {}

    def submitted(self, fut: TaskFuture, backend: ExecutionBackend, uid: str) -> None:
        self.live[uid] = (fut, backend)

    def accepted(self, backend: ExecutionBackend, specs: list[TaskSpec]) -> None:
        """``backend`` took ``specs``: the services among them are up, unless
        the backend will say when they start."""
        if Capability.REPORTS_RUNNING in backend.info.capabilities:
            return
        loop = self._state.loop
        assert loop is not None
        for spec in specs:
            if spec.uid in self.live:
                # after the reports the adapter made while accepting (a refusal)
                loop.call_soon(self.up, spec.uid)

    def up(self, uid: str) -> None:
        entry = self.live.get(uid)
        if entry is None or entry[0].state not in LIVE:
            return
        fut, backend = entry
        label = self._state.hub.label(backend, backend.info.name)
        self._scheduler.finish_ok(fut, Service(fut.uid, fut.name, label))

    def ended(self, uid: str, ok: bool, value: Any) -> bool:
        """The runtime reports the end of ``uid``; True when it was a service
        already up, whose future has nothing more to say."""
        entry = self.live.pop(uid, None)
        if entry is None or entry[0].state in LIVE:
            return False
        fut = entry[0]
        if ok:
            log.info("service task %s ended while the workflow ran", fut.uid)
        else:
            log.warning("service task %s failed while up: %r", fut.uid, value)
        return True

    def stop_all(self) -> dict[int, tuple[ExecutionBackend, list[str]]]:
        """The services that are up, to cancel in their runtimes at shutdown."""
        out: dict[int, tuple[ExecutionBackend, list[str]]] = {}
        inflight = self._state.inflight
        for uid, (fut, backend) in list(self.live.items()):
            if fut.state not in LIVE:
                inflight.pop(uid, None)
                out.setdefault(id(backend), (backend, []))[1].append(uid)
        self.live.clear()
        return out
