"""Short function tasks several to a Parsl task (see :mod:`..toolkit.chunks`).

A Parsl task costs the driver a DFK task record, a launch on the DFK's launch
thread, two trips through the interchange and Parsl's serialisation: around a
millisecond, which is all of a no-op's run.  So when one batch holds many
calls of one function (a fan-out, a sweep, a chain called in one go), those
calls go through a chunk queue: several to one HTEX task running
:func:`~asyncflow.worker.run_chunk`, sized to a few milliseconds of measured
work, with a chain's hops fused to run on inside one worker.  Everything else
keeps Parsl's path: small batches, executables, tasks with resources or Parsl
options (``executor``, ``parsl_resource_specification``).

Only a sized HighThroughputExecutor chunks.  Parsl's ThreadPoolExecutor runs
tasks in the driver and passes values by reference: chunks would pickle every
argument and outcome (an unpicklable value would fail where it works today) to
save only the DFK's bookkeeping.  An HTEX whose worker count is unknown
(``max_workers_per_node`` left infinite) cannot size its chunks, and an MPI one
needs a resource specification per task.

The DFK is not safe to submit to from two threads at once (its task ids are
counted without a lock), and an AppFuture's callbacks run on HTEX's result
thread; chunks are therefore sent from the event loop, like every other task,
and a chunk's future here is a stand-in resolved from Parsl's.
"""

from __future__ import annotations

import contextlib
import pickle
from collections.abc import Sequence
from concurrent.futures import Future, InvalidStateError
from typing import Any

from parsl.executors.errors import BadStateException
from parsl.executors.high_throughput.errors import ManagerLost, WorkerLost
from parsl.jobs.errors import TooManyJobFailuresError

from ...protocol import CompletionSink
from ...spec import TaskSpec
from ...worker import Call
from ..toolkit import FunctionCache
from ..toolkit.chunks import ChunkQueue, cancel_future
from ..toolkit.routing import MIN_BURST, plain_call, route
from .executors import Profile
from .state import InterchangeLost, State, bad_state, log
from .worker import chunk_task

__all__ = ["ParslChunks", "chunkable"]

_PARSL_OPTIONS = ("executor", "parsl_resource_specification")


def chunkable(profile: Profile) -> bool:
    """Whether tasks for this executor may travel in chunks (see the module)."""
    return profile.htex and profile.sized and not profile.mpi


class ParslChunks:
    """The chunk queue of one Parsl backend, and what decides who uses it."""

    def __init__(self, state: State, enabled: bool):
        self._state = state
        self.enabled = enabled and chunkable(state.profiles[state.label])
        #: calls of one function in a batch from which they are chunked (set
        #: at start from the executor's size unless given)
        self.burst: int | None = None
        self.queue: ChunkQueue | None = None
        self._functions = FunctionCache("Parsl workers")
        self._keys: dict[Future[Any], str] = {}  # stand-in -> its Parsl task's key

    def start(self, sink: CompletionSink) -> None:
        """Make the queue once the DFK is up."""
        if not self.enabled:
            return
        slots = self._state.profiles[self._state.label].slots
        self.queue = ChunkQueue(
            self._send, _lost, slots, sink, self._functions.blob, "Parsl executor"
        )
        if self.burst is None:
            self.burst = max(MIN_BURST, 2 * slots)

    # -- routing -------------------------------------------------------------------
    def route(self, specs: Sequence[TaskSpec]) -> tuple[list[TaskSpec], list[str]]:
        """Take the specs that go in chunks; the rest for Parsl, and the uids
        of piped specs not all of whose upstreams are here (Parsl's path takes
        plain values only)."""
        queue, burst = self.queue, self.burst
        if queue is None or burst is None:
            return _unchunked(specs)
        return route(queue, specs, burst, _eligible, native_pipes=False)

    # -- Parsl's side --------------------------------------------------------------
    def _send(self, calls: list[Call]) -> Future[Any]:
        stand_in: Future[Any] = Future()
        loop = self._state.life.loop
        assert loop is not None
        # A closed loop raises RuntimeError: the queue fails the chunk's tasks.
        loop.call_soon_threadsafe(self._launch, calls, stand_in)
        return stand_in

    def _launch(self, calls: list[Call], stand_in: Future[Any]) -> None:
        """One ``dfk.submit`` of ``chunk_task``, on the executor the tasks
        would have gone to, with the cancel channel a function task gets."""
        if stand_in.done():
            return  # every task of it was cancelled meanwhile
        state = self._state
        dfk = state.dfk
        if state.life.closed or dfk is None or dfk.cleanup_called:
            cancel_future(stand_in)  # the queue reports the DFK shut down
            return
        gone = bad_state(state, state.label)
        if gone is not None:  # fail now, not after a DFK launch
            stand_in.set_exception(gone)
            return
        key = f"{state.token}.{next(state.counter)}"
        control = state.runtime.control
        local = state.profiles[state.label].local
        ctl = control.ctl if control is not None and local else None
        try:
            packed = pickle.dumps((calls, key, ctl), protocol=5)
            fut = dfk.submit(chunk_task, (packed,), [state.label], False, None, {})
        except Exception as exc:
            stand_in.set_exception(exc)
            return
        self._keys[stand_in] = key
        stand_in.add_done_callback(self._forget)
        fut.add_done_callback(lambda f: self._copy(f, stand_in, key))

    def _forget(self, stand_in: Future[Any]) -> None:
        key = self._keys.pop(stand_in, None)
        if key is not None and stand_in.cancelled():
            self._stop(key)  # every task of the chunk was cancelled

    def _stop(self, key: str) -> None:
        """Cancel a chunk's Parsl task as the Canceller does a function task's:
        its marker skips it if it has not started, and (unless killing was
        turned off) its worker dies if it has.  Out of reach elsewhere."""
        state = self._state
        control = state.runtime.control
        if control is None or not state.profiles[state.label].local:
            return
        control.cancel([key], [key] if state.kill_functions else [])

    def _copy(self, app_future: Future[Any], stand_in: Future[Any], key: str) -> None:
        """Parsl's outcome into the stand-in (HTEX's result thread)."""
        if stand_in.cancelled():
            control = self._state.runtime.control
            if control is not None:
                control.forget([key])  # its cancel marker
            return
        try:
            exc = app_future.exception()
            value = None if exc is not None else pickle.loads(app_future.result())
        except Exception as err:  # the stand-in must end, or its tasks hang
            exc, value = err, None
        with contextlib.suppress(InvalidStateError):  # cancelled under us
            if exc is not None:
                stand_in.set_exception(exc)
            else:
                stand_in.set_result(value)

    # -- cancel and close ------------------------------------------------------------
    def cancel(self, uids: Sequence[str]) -> list[str]:
        """Cancel the chunked ones among ``uids``; return the others."""
        return list(uids) if self.queue is None else self.queue.cancel_many(uids)

    def close(self) -> None:
        """Stop sending, and stop the chunks still out (their tasks fail as
        shut down)."""
        queue, self.queue = self.queue, None
        if queue is None:
            return
        for stand_in in queue.close():
            cancel_future(stand_in)
        self._functions.clear()


def _unchunked(specs: Sequence[TaskSpec]) -> tuple[list[TaskSpec], list[str]]:
    """Before start (or after close) nothing is piped here: refuse the piped."""
    rest = [s for s in specs if not s.has_remote_args]
    return rest, [s.uid for s in specs if s.has_remote_args]


def _eligible(spec: TaskSpec) -> bool:
    opts = spec.options
    return plain_call(spec, "parsl") and not (
        opts and any(k in opts for k in _PARSL_OPTIONS)
    )


def _lost(exc: BaseException) -> str | None:
    """What a chunk's failure in Parsl means for every task in it: a lost
    worker, manager, interchange or batch job says so; anything else (Parsl
    refused or could not move it) is left to the queue's generic message."""
    if isinstance(exc, BadStateException):
        cause = getattr(getattr(exc, "executor", None), "executor_exception", None)
        if isinstance(cause, InterchangeLost):
            exc = cause
        else:
            return f"the Parsl executor running its chunk failed ({exc})"
    if isinstance(exc, InterchangeLost):
        return str(exc)
    if isinstance(exc, WorkerLost | ManagerLost):
        return (
            f"the Parsl worker running its chunk was lost ({exc}); use retries= "
            "to re-run such tasks"
        )
    if isinstance(exc, TooManyJobFailuresError):
        return (
            "the block holding the Parsl workers failed, and Parsl gave the "
            f"executor up ({exc})"
        )
    log.debug("a chunk failed in Parsl: %r", exc)
    return None
