"""Outcomes: how results, failures and losses come back from Parsl.

Each ``AppFuture``'s done callback, run on Parsl's result or launch thread,
feeds the sink directly: no thread and no polling per task.  A packed task's
result comes back pickled (see ``worker.packed_task``) and is unpickled here,
and Parsl's failures are translated into asyncflow's errors naming the task.

Parsl does not notice when an HTEX interchange dies, nor when the batch job
holding its workers ends (it starts no new block here): the tasks would wait
forever.  :class:`Watch` marks such an executor bad, which makes Parsl fail
every task it holds and any later one, and fails the backend's own tasks at
once with a WorkerLostError that says what happened.
"""

from __future__ import annotations

import asyncio
import contextlib
import pickle
from collections.abc import Callable
from concurrent.futures import CancelledError, Future, InvalidStateError
from typing import Any

from parsl.executors import HighThroughputExecutor
from parsl.executors.errors import BadStateException, InvalidResourceSpecification
from parsl.executors.high_throughput.errors import ManagerLost, WorkerLost
from parsl.jobs.errors import TooManyJobFailuresError
from parsl.serialize.errors import DeserializationError
from parsl.serialize.errors import SerializationError as ParslSerializationError

from ...errors import ResourceUnavailableError, SerializationError, WorkerLostError
from .runtime import dead_interchanges
from .state import InterchangeLost, JobLost, State, Task, bad_state, log

#: How often a backend checks that the HTEX interchanges it uses still run.
WATCH_PERIOD = 0.5


class Completions:
    """The ``AppFuture`` done callback and the errors it reports.

    ``forget`` is told about a task that ended after it was cancelled: the
    engine has resolved it already, but its cancel marker must go."""

    __slots__ = ("_forget", "_state")

    def __init__(self, state: State, forget: Callable[[str], None]):
        self._state = state
        self._forget = forget

    def done(self, fut: Future[Any]) -> None:
        """The done callback of every ``AppFuture`` (Parsl's threads)."""
        uid: str = fut._asyncflow_uid  # type: ignore[attr-defined]
        state = self._state
        task = state.tasks.pop(uid, None)
        if task is None:
            self._forget(uid)  # cancelled: the engine already resolved it
            return
        sink = state.sink
        assert sink is not None
        try:
            exc = fut.exception()
        except CancelledError:
            return
        if exc is None:
            value = fut.result()
            if type(value) is bytes and task.packed:
                try:
                    value = pickle.loads(value)
                except Exception as err:
                    sink.set_exception(
                        uid,
                        SerializationError(
                            f"task {task.name!r}: its result cannot be unpickled in "
                            f"the driver ({type(err).__name__}: {err})"
                        ),
                    )
                    return
            sink.set_result(uid, value)
            return
        shared = bad_state(state, task.label)
        if shared is not None and exc is shared:
            # Parsl raises the executor's one exception for each task still
            # queued in the DFK, and every raise lengthens its traceback.
            shared.__traceback__ = None
        sink.set_exception(uid, translate(exc, task))


def translate(exc: BaseException, task: Task) -> BaseException:
    """Parsl's failure of ``task`` as the error asyncflow reports for it."""
    if isinstance(exc, WorkerLost | ManagerLost):
        return WorkerLostError(
            f"task {task.name!r}: the Parsl worker running it died ({exc})"
        )
    if isinstance(exc, TooManyJobFailuresError):
        return WorkerLostError(
            f"task {task.name!r}: the block of Parsl executor {task.label!r} "
            f"holding its workers failed, and Parsl gave the executor up ({exc})"
        )
    if isinstance(exc, InvalidResourceSpecification):
        return ResourceUnavailableError(
            f"task {task.name!r}: Parsl executor {task.label!r} rejected its "
            f"resource specification ({exc})"
        )
    if isinstance(exc, ParslSerializationError | DeserializationError):
        return SerializationError(f"task {task.name!r}: {exc}")
    if isinstance(exc, BadStateException):
        # Parsl keeps only the text of the bad state's exception here.
        cause = getattr(getattr(exc, "executor", None), "executor_exception", None)
        if isinstance(cause, InterchangeLost):
            exc = cause
        else:
            return WorkerLostError(
                f"task {task.name!r}: Parsl executor {task.label!r} failed ({exc})"
            )
    if isinstance(exc, InterchangeLost):  # raised by submit once marked bad
        return exc.for_task(task.name)
    return exc


class Watch:
    """The interchange watch (a background task) and the Slurm job's end."""

    __slots__ = ("_state",)

    def __init__(self, state: State):
        self._state = state

    async def interchanges(self) -> None:
        """Check every ``WATCH_PERIOD`` until shutdown cancels it or the DFK
        is cleaned up."""
        while True:
            await asyncio.sleep(WATCH_PERIOD)
            if not self._check_interchanges():
                return

    def _check_interchanges(self) -> bool:
        """Mark the executors whose interchange exited bad; False once there
        is nothing left to watch."""
        state = self._state
        dfk = state.dfk
        if state.life.closed or dfk is None or dfk.cleanup_called:
            return False
        for ex, code in dead_interchanges(dfk):
            if ex.label not in state.profiles or ex.bad_state_is_set:
                continue
            err = InterchangeLost(
                f"the interchange of Parsl executor {ex.label!r} exited (code "
                f"{code}), so the executor can run no more tasks; start a new "
                "backend"
            )
            try:
                ex.set_bad_state_and_fail_all(err)
            except Exception:  # its task table changed under us: try again
                log.warning("could not fail the tasks of %s", ex.label, exc_info=True)
        return True

    def jobs_lost(self, message: str) -> None:
        """The Slurm job holding this backend's workers ended under it
        (walltime, node failure, someone's ``scancel``; called from the job
        watch thread): fail every unfinished task now, and mark the executor
        bad so that later ones fail at once too."""
        state = self._state
        if state.life.closed:
            return
        err = JobLost(
            f"{message}; Parsl executor {state.label!r} can run no more tasks, "
            "start a new backend"
        )
        batch = state.runtime.batch
        ex = batch.executor if batch is not None and state.runtime.dfk else None
        if ex is not None and not ex.bad_state_is_set:
            _fail_executor(ex, err)
        sink = state.sink
        for uid in list(state.tasks):
            task = state.tasks.pop(uid, None)
            if task is not None and sink is not None:
                sink.set_exception(uid, err.for_task(task.name))


def _fail_executor(ex: HighThroughputExecutor, err: JobLost) -> None:
    """Mark ``ex`` bad so that later tasks fail at once, failing its own."""
    try:
        ex.set_bad_state_and_fail_all(err)
    except RuntimeError:  # its task table changed under us: once more
        for fut in list(ex.tasks.values()):
            with contextlib.suppress(InvalidStateError):
                fut.set_exception(BadStateException(ex, err))
