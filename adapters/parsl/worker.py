"""What runs in Parsl workers.

Parsl ships these module-level functions by reference, so a worker imports this
module by its path, ``asyncflow.adapters.parsl.worker``: keep them here.  Each
checks its task's cancel marker before it starts anything (see ``cancel``).  For
out-of-process executors a function task's function, arguments and result travel
as one pickled bytes object (``_run_packed``); exceptions lose their traceback
objects on the way back, and whatever cannot be pickled becomes a
SerializationError naming the task.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from typing import Any

import cloudpickle

from ...errors import SerializationError
from ...worker import call_function, call_pickled, run_command
from .cancel import (
    _INPROC_CANCELLED,
    _W_FUNCTION,
    _W_LOCK,
    _W_STARTING,
    _is_cancelled,
    _listen,
)


class _Cancelled(Exception):
    """A cancelled task reached a worker; it never reaches the user."""


def _run_command(
    command: Any,
    key: str,
    name: str,
    ctl: str | None,
    parsl_resource_specification: Any = None,
) -> str:
    _listen(ctl)
    with _W_LOCK:
        _W_STARTING.add(key)
    try:
        if _is_cancelled(ctl, key):
            raise _Cancelled(key)
        return run_command(command, key, name)
    finally:
        with _W_LOCK:
            _W_STARTING.discard(key)


def _run_inproc(
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    is_async: bool,
    name: str,
    key: str,
    parsl_resource_specification: Any = None,
) -> Any:
    if key in _INPROC_CANCELLED:
        raise _Cancelled(key)
    return call_function(fn, args, kwargs, is_async, name)


_PLAIN = frozenset({type(None), bool, int, float, str})


def _run_packed(packed: bytes, parsl_resource_specification: Any = None) -> Any:
    """Run a function task out of process; in and out travel as one bytes object.

    Parsl serialises arguments with dill, object by object; one pickled blob
    halves its per-task cost and leaves the choice of pickler to asyncflow.
    """
    blob, args, kwargs, is_async, name, key, ctl = pickle.loads(packed)
    _listen(ctl)
    with _W_LOCK:
        if _is_cancelled(ctl, key):
            raise _Cancelled(key)
        _W_FUNCTION[0] = key
    try:
        result = call_pickled(blob, args, kwargs, is_async, name)
    except BaseException as exc:
        raise _portable(exc, name)  # noqa: B904 - keeps the cause chain
    finally:
        with _W_LOCK:
            _W_FUNCTION[0] = None
    if type(result) in _PLAIN:
        return result  # Parsl ships these faster than the bytes of their pickle
    try:
        return pickle.dumps(result, protocol=5)
    except Exception:
        pass
    try:
        return cloudpickle.dumps(result, protocol=5)
    except Exception as exc:
        raise SerializationError(
            f"task {name!r}: its result of type {type(result).__name__} cannot be "
            f"pickled ({type(exc).__name__}: {exc}); return plain data"
        ) from None


def _portable(exc: BaseException, name: str) -> BaseException:
    """``exc`` made fit for the trip back through Parsl.

    The worker traceback already travels as a note (see ``call_function``), so
    the traceback objects are dropped: Parsl pickles them frame by frame, and a
    RecursionError's thousand frames kill the worker.  An exception that cannot
    be pickled at all is replaced by a SerializationError that says what it was.
    """
    cause: BaseException | None = exc
    while cause is not None:
        cause.__traceback__ = None
        cause = cause.__cause__
    try:
        cloudpickle.dumps(exc)
    except Exception as err:
        new = SerializationError(
            f"task {name!r} raised {type(exc).__name__}({exc}), which cannot be "
            f"pickled back to the driver ({type(err).__name__}: {err})"
        )
        for note in getattr(exc, "__notes__", ()):
            new.add_note(note)
        return new
    return exc
