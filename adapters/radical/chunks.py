"""Short function tasks several to a raptor task (see :mod:`..toolkit.chunks`).

A raptor function task costs radical.pilot's components tens of milliseconds
of messaging, so a pilot runs ten to twenty of them a second whatever they
do.  When one batch holds many calls of one function (a fan-out, a sweep), the
calls travel through a chunk queue instead: several to one raptor task, sized
to a few milliseconds of measured work, each still reported on its own.  Other
tasks keep their own raptor task: small batches, executables, tasks with
``resources=`` or ``options={'radical': ...}``.

A chunk is an ordinary raptor function task whose function is
:func:`~asyncflow.worker.run_chunk`; its record answers a stand-in future
rather than the engine's sink, and the dispatcher's queue is thread-safe, so
chunks are sent from whichever thread finished the last one.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

from ...errors import WorkerLostError
from ...protocol import CompletionSink
from ...spec import TaskSpec
from ...worker import Call, run_chunk
from ..toolkit import FunctionCache
from ..toolkit.chunks import ChunkQueue
from ..toolkit.routing import MIN_BURST, plain_call, route
from ._rp import rp
from .dispatch import Dispatcher, Record
from .worker import unpack_result

__all__ = ["RadicalChunks"]


class RadicalChunks:
    """The chunk queue of one radical.pilot backend, and what decides who uses
    it.  ``lost`` turns a chunk's raptor task that did not finish into the
    error its tasks get (the backend's own rule for lost tasks)."""

    def __init__(
        self,
        dispatcher: Dispatcher,
        slots: int,
        lost: Callable[[str, Any, str], BaseException],
        enabled: bool,
    ):
        self._dispatcher = dispatcher
        self._slots = slots
        self._lost = lost
        self.enabled = enabled and slots > 0
        self.burst: int | None = None
        self.queue: ChunkQueue | None = None
        self._functions = FunctionCache("a raptor worker")
        self._names = itertools.count(1)
        self._records: dict[Future[Any], Record] = {}
        #: the chunked functions' modules: raptor forks a process per task
        #: from a worker that must have imported them (see the worker)
        self._modules: set[str] = set()

    def start(self, sink: CompletionSink) -> None:
        if not self.enabled:
            return
        self.close()
        self.queue = ChunkQueue(
            self._send, _loss, self._slots, sink, self._functions.blob, "pilot"
        )
        if self.burst is None:
            self.burst = max(MIN_BURST, 2 * self._slots)

    def route(self, specs: Sequence[TaskSpec]) -> list[TaskSpec]:
        """Queue the specs that go in chunks; return the rest."""
        queue, burst = self.queue, self.burst
        if queue is None or burst is None:
            return list(specs)
        self._modules.update(
            m for s in specs if (m := getattr(s.function, "__module__", None))
        )
        rest, _ = route(queue, specs, burst, _eligible)  # nothing is piped here
        return rest

    # -- radical.pilot's side --------------------------------------------------------
    def _send(self, calls: list[Call]) -> Future[Any]:
        stand_in: Future[Any] = Future()
        name = f"chunk.{next(self._names):06d}"
        spec = TaskSpec(
            uid=name,
            name=f"chunk of {len(calls)}",
            function=run_chunk,
            args=(calls,),
            options={"asyncflow_modules": tuple(sorted(self._modules))},
        )
        rec = Record(_ChunkOwner(stand_in, self._lost), name, spec.name, None, spec)
        self._records[stand_in] = rec
        stand_in.add_done_callback(self._forget)
        self._dispatcher.submit([rec])
        return stand_in

    def _forget(self, stand_in: Future[Any]) -> None:
        rec = self._records.pop(stand_in, None)
        if rec is not None and stand_in.cancelled():
            self._dispatcher.cancel([rec])  # every task of it was cancelled

    def cancel(self, uids: Sequence[str]) -> list[str]:
        """Cancel the chunked ones among ``uids``; return the others."""
        return list(uids) if self.queue is None else self.queue.cancel_many(uids)

    def close(self) -> None:
        queue, self.queue = self.queue, None
        if queue is None:
            return
        out = [self._records.pop(f) for f in queue.close() if f in self._records]
        if out:
            self._dispatcher.cancel(out)
        self._functions.clear()


class _ChunkOwner:
    """Stands in for the backend on a chunk's record: the dispatcher reports
    the chunk's raptor task here, and the outcome resolves the stand-in."""

    def __init__(
        self, stand_in: Future[Any], lost: Callable[[str, Any, str], BaseException]
    ):
        self._stand_in = stand_in
        self._lost = lost

    def _deliver_running(self, rec: Record) -> None:
        pass  # each task's own run is reported with its outcome (set_ran)

    def _deliver_error(self, rec: Record, exc: BaseException) -> None:
        if not self._stand_in.done():
            self._stand_in.set_exception(exc)

    def _deliver(self, rec: Record, task: Any, state: str) -> None:
        if self._stand_in.done():
            return
        if state == rp.DONE:
            ok, value = unpack_result(rec.name, task.return_value)
        else:
            ok, value = False, self._lost(rec.name, task, state)
        if ok:
            self._stand_in.set_result(value)
        else:
            self._stand_in.set_exception(value)


def _eligible(spec: TaskSpec) -> bool:
    return plain_call(spec, "radical")


def _loss(exc: BaseException) -> str:
    """Every task of a chunk whose raptor task failed is lost with it."""
    if isinstance(exc, WorkerLostError):
        return str(exc)
    return f"its chunk's raptor task failed ({type(exc).__name__}: {exc})"
