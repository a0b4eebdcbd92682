"""Where adapters report outcomes: any thread in, batched onto the loop out."""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from typing import TYPE_CHECKING, Any

from .events import EventKind
from .future import TaskState

if TYPE_CHECKING:
    from .scheduler import Scheduler
    from .state import EngineState

__all__ = ["Sink"]


class Sink:
    """Completions from any thread, delivered to the loop in batches."""

    __slots__ = ("_loop", "_queue", "_scheduled", "_scheduler", "_state", "_thread")

    def __init__(
        self,
        scheduler: Scheduler,
        state: EngineState,
        loop: asyncio.AbstractEventLoop,
    ):
        self._scheduler = scheduler
        self._state = state
        self._loop = loop
        self._queue: deque[tuple[str, int, Any]] = deque()
        self._scheduled = False
        self._thread = threading.get_ident()

    def set_result(self, uid: str, value: Any) -> None:
        self._push((uid, 0, value))

    def set_exception(self, uid: str, exc: BaseException) -> None:
        self._push((uid, 1, exc))

    def set_running(self, uid: str) -> None:
        state = self._state
        # only observers and services care; skip the hop otherwise
        if state.hub.subscribers or state.services.live:
            self._push((uid, 2, None))

    def set_backend_state(self, backend: object, state: str, detail: str) -> None:
        if self._state.hub.subscribers:
            self._push(("", 3, (backend, state, detail)))

    def set_ran(self, uid: str, start: float, end: float, worker: str) -> None:
        if self._state.hub.subscribers:  # only traces and observers use it
            self._push((uid, 4, (start, end, worker)))

    def _push(self, item: tuple[str, int, Any]) -> None:
        self._queue.append(item)
        if not self._scheduled:
            self._scheduled = True
            try:
                if threading.get_ident() == self._thread:
                    self._loop.call_soon(self._drain)
                else:
                    self._loop.call_soon_threadsafe(self._drain)
            except RuntimeError:  # loop closed: nobody is waiting any more
                pass

    def _drain(self) -> None:
        # Clear the flag *before* popping: a producer that appends after this
        # point schedules another drain, one that appended before is seen below.
        self._scheduled = False
        queue = self._queue
        state = self._state
        inflight, services = state.inflight, state.services
        scheduler = self._scheduler
        while queue:
            uid, kind, value = queue.popleft()
            if kind > 1:  # observers only: results and errors pay one test
                self._observe(uid, kind, value)
                continue
            fut = inflight.pop(uid, None)
            if fut is None:
                continue  # cancelled or timed out meanwhile
            if services.live and services.ended(uid, not kind, value):
                continue
            if kind == 0:
                scheduler.finish_ok(fut, value)
            else:
                scheduler.finish_error(fut, value)

    def _observe(self, uid: str, kind: int, value: Any) -> None:
        """A report for observers: a backend's state, or a task's start."""
        hub = self._state.hub
        if kind == 3:
            hub.backend_state(*value)
            return
        fut = self._state.inflight.get(uid)
        if fut is not None and fut._tstate is TaskState.SUBMITTED:
            fut._tstate = TaskState.RUNNING
            if hub.subscribers:
                if kind == 4:
                    hub.ran(fut, *value)
                else:
                    hub.task(EventKind.RUNNING, fut)
        services = self._state.services
        if services.live:
            services.up(uid)
