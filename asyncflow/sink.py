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

__all__ = ["_Sink"]


class _Sink:
    """Completions from any thread, delivered to the loop in batches."""

    __slots__ = ("_engine", "_loop", "_queue", "_scheduled", "_thread")

    def __init__(self, engine: Scheduler, loop: asyncio.AbstractEventLoop):
        self._engine = engine
        self._loop = loop
        self._queue: deque[tuple[str, int, Any]] = deque()
        self._scheduled = False
        self._thread = threading.get_ident()

    def set_result(self, uid: str, value: Any) -> None:
        self._push((uid, 0, value))

    def set_exception(self, uid: str, exc: BaseException) -> None:
        self._push((uid, 1, exc))

    def set_running(self, uid: str) -> None:
        engine = self._engine
        # only observers and services care; skip the hop otherwise
        if engine._subscribers or engine._services.live:
            self._push((uid, 2, None))

    def set_backend_state(self, backend: object, state: str, detail: str) -> None:
        if self._engine._subscribers:
            self._push(("", 3, (backend, state, detail)))

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
        inflight = self._engine._inflight
        engine = self._engine
        while queue:
            uid, kind, value = queue.popleft()
            if kind > 1:  # observers only: results and errors pay one test
                if kind == 3:
                    engine._emit_backend(*value)
                    continue
                fut = inflight.get(uid)
                if fut is not None and fut._tstate is TaskState.SUBMITTED:
                    fut._tstate = TaskState.RUNNING
                    if engine._subscribers:
                        engine._emit(EventKind.RUNNING, fut)
                if engine._services.live:
                    engine._services.up(uid)
                continue
            fut = inflight.pop(uid, None)
            if fut is None:
                continue  # cancelled or timed out meanwhile
            if engine._services.live and engine._services.ended(uid, not kind, value):
                continue
            if kind == 0:
                engine._finish_ok(fut, value)
            else:
                engine._finish_error(fut, value)
