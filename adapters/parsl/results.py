"""Completions: how results come back from Parsl.

Each ``AppFuture``'s done callback, run on Parsl's result or launch thread,
feeds the sink directly: no thread and no polling per task.  A packed task's
result comes back pickled (see ``worker._run_packed``) and is unpickled here,
and Parsl's failures are translated into asyncflow's errors naming the task.
"""

from __future__ import annotations

import pickle
from concurrent.futures import CancelledError, Future
from typing import Any

from parsl.executors.errors import BadStateException, InvalidResourceSpecification
from parsl.executors.high_throughput.errors import WorkerLost
from parsl.serialize.errors import DeserializationError
from parsl.serialize.errors import SerializationError as ParslSerializationError

from ...errors import ResourceUnavailableError, SerializationError, WorkerLostError
from .base import _InterchangeLost, _ParslBase, _Task


class _ResultsMixin(_ParslBase):
    """The ``AppFuture`` done callback and the errors it reports."""

    # -- completion (Parsl's result or launch thread) ---------------------------
    def _done(self, fut: Future[Any]) -> None:
        uid: str = fut._asyncflow_uid  # type: ignore[attr-defined]
        task = self._tasks.pop(uid, None)
        if task is None:
            self._forget(uid)  # cancelled: the engine already resolved it
            return
        sink = self._sink
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
        sink.set_exception(uid, self._translate(exc, task))

    @staticmethod
    def _translate(exc: BaseException, task: _Task) -> BaseException:
        if isinstance(exc, WorkerLost):
            return WorkerLostError(
                f"task {task.name!r}: the Parsl worker running it died ({exc})"
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
            if isinstance(cause, _InterchangeLost):
                exc = cause
            else:
                return WorkerLostError(
                    f"task {task.name!r}: Parsl executor {task.label!r} failed ({exc})"
                )
        if isinstance(exc, _InterchangeLost):  # raised by submit once marked bad
            return WorkerLostError(f"task {task.name!r}: {exc}")
        return exc
