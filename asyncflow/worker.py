"""Code that runs *inside* workers, whatever the runtime.

Every adapter calls these so that a task behaves the same on every backend: the
same exception types with the worker traceback attached, the same treatment of
``async def``, and the same subprocess handling for executables.  The module
imports nothing heavy because it is imported in every worker process.

Running a task
    :func:`run_spec` runs a whole :class:`~asyncflow.spec.TaskSpec`;
    :func:`call_function` and :func:`run_command` are its two halves.  What they
    raise is what the adapter reports: the task's own exception as itself,
    :class:`~asyncflow.errors.ExecutableFailedError` for a command that exited
    non-zero, :class:`~asyncflow.errors.TaskInterruptedError` for a task that
    raised ``SystemExit`` or ``KeyboardInterrupt``.

Killing a command
    See :mod:`asyncflow.commands`, which runs them.
"""

from __future__ import annotations

import asyncio
import functools
import os
import pickle
import time
import traceback
from collections.abc import Callable
from typing import Any

import cloudpickle

from .commands import run_command
from .errors import (
    SerializationError,
    TaskInterruptedError,
)
from .spec import TaskSpec
from .walk import replace

__all__ = [
    "WORKER_ENV",
    "call_function",
    "call_pickled",
    "dumps_function",
    "run_chunk",
    "run_spec",
]


def call_function(
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    is_async: bool,
    name: str,
) -> Any:
    """Run a task's function; ``async def`` ones get a fresh loop of their own."""
    try:
        if is_async:
            return asyncio.run(fn(*args, **kwargs))
        return fn(*args, **kwargs)
    except (SystemExit, KeyboardInterrupt) as exc:
        # Never let a task's exit request travel to the driver's event loop.
        raise TaskInterruptedError(
            f"task {name!r} raised {type(exc).__name__}({exc}) inside the worker; "
            "raise an ordinary exception to signal failure"
        ) from None
    except Exception as exc:
        _attach_traceback(exc, name)
        raise


def _attach_traceback(exc: BaseException, name: str) -> None:
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    try:
        exc.add_note(f"[asyncflow] traceback of task {name!r} in the worker:\n{text}")
    except Exception:  # pragma: no cover - exotic exception classes
        pass


def dumps_function(fn: Callable[..., Any]) -> bytes:
    """cloudpickle a function so closures and lambdas reach other processes."""
    return cloudpickle.dumps(fn)


@functools.lru_cache(maxsize=512)
def _loads(blob: bytes) -> Callable[..., Any]:
    fn: Callable[..., Any] = cloudpickle.loads(blob)
    return fn


def call_pickled(
    blob: bytes,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    is_async: bool,
    name: str,
) -> Any:
    return call_function(_loads(blob), args, kwargs, is_async, name)


#: one pickled call: (function blob, pickled (args, kwargs), is_async, task name,
#: whether the arguments hold ChunkRefs)
Call = tuple[bytes, bytes, bool, str, bool]


class ChunkRef:
    """Stands for the value of an earlier call of the same chunk (a dependent
    that travels with its upstream, so a chain runs on in the worker)."""

    __slots__ = ("index",)

    def __init__(self, index: int):
        self.index = index

    def __reduce__(self) -> tuple[Any, ...]:
        return ChunkRef, (self.index,)


class _Skip(Exception):
    """An upstream in the chunk failed: the driver fails this call itself."""


#: a call's outcome: (ok, value or pickled value, pickled?); ok None: skipped
Outcome = tuple[bool | None, Any, bool]


#: when a call started (``time.time()``) and how many seconds it took; -1: skipped
Span = tuple[float, float]


#: names the worker a chunk ran on, where that is not the process running it
#: (radical.pilot forks a process per task from each worker)
WORKER_ENV = "ASYNCFLOW_WORKER"


def run_chunk(calls: list[Call]) -> tuple[list[Outcome], list[Span], str]:
    """Run several calls in one pool process, one after the other.

    Each outcome is pickled on its own, so that a result or exception that
    cannot be pickled fails its own task and not the chunk; only values of types
    that always pickle (numbers, strings, bytes, plain numpy arrays) travel as
    they are, so a large array is not copied twice.  A call whose
    upstream in the chunk failed is skipped (outcome ``None``).  Also returns
    when each call started and how long it took, measured here (the sender
    sizes later chunks from it, and traces show each task's own run rather than
    its chunk's), and the worker they ran on (``$ASYNCFLOW_WORKER``, or this
    process's pid).
    """
    out: list[Outcome] = []
    seconds: list[Span] = []
    values: list[Any] = []
    clock = time.perf_counter
    wall = time.time
    for blob, payload, is_async, name, linked in calls:
        began = wall()
        start = clock()
        ok = False
        try:
            args, kwargs = pickle.loads(payload)
            if linked:
                args, kwargs = _link(args, values), _link(kwargs, values)
            value = call_pickled(blob, args, kwargs, is_async, name)
            ok = True
        except _Skip:
            values.append(_SKIPPED)
            out.append((None, None, False))
            seconds.append((began, -1.0))
            continue
        except BaseException as exc:
            value = exc
        values.append(value if ok else _SKIPPED)
        if ok and _always_pickles(value):
            out.append((True, value, False))
            seconds.append((began, clock() - start))
            continue
        try:
            out.append((ok, _dumps_outcome(value), True))
        except Exception as exc:
            values[-1] = _SKIPPED  # the driver fails it: so do its dependents here
            what = "result" if ok else f"exception ({type(value).__name__})"
            error = SerializationError(
                f"task {name!r}: its {what} cannot be pickled back to the driver "
                f"({type(exc).__name__}: {exc}); return plain data, or define its "
                "types at module level"
            )
            out.append((False, pickle.dumps(error), True))
        seconds.append((began, clock() - start))
    return out, seconds, os.environ.get(WORKER_ENV) or f"pid {os.getpid()}"


_SKIPPED = object()


def _dumps_outcome(value: Any) -> bytes:
    """Pickle a call's outcome; an exception without its tracebacks.

    The worker's traceback already travels as text in the exception's note.  A
    process that imported distributed pickles exceptions *with* their tracebacks
    (it installs tblib's reducer for every exception), and a RecursionError's
    1,000 frames then exceed the recursion limit while pickling.  concurrent.futures
    drops the traceback before pickling for the same reason."""
    if isinstance(value, BaseException):
        seen: set[int] = set()
        exc: BaseException | None = value
        while exc is not None and id(exc) not in seen:
            seen.add(id(exc))
            exc.__traceback__ = None
            exc = exc.__cause__ or exc.__context__
    return pickle.dumps(value, pickle.HIGHEST_PROTOCOL)


_PLAIN = frozenset({int, float, complex, bool, str, bytes, type(None)})


def _always_pickles(value: Any) -> bool:
    t = type(value)
    if t in _PLAIN:
        return True
    if t.__name__ == "ndarray" and t.__module__ == "numpy":
        return not value.dtype.hasobject
    return False


def _link(obj: Any, values: list[Any]) -> Any:
    def value_of(ref: ChunkRef) -> Any:
        value = values[ref.index]
        if value is _SKIPPED:
            raise _Skip
        return value

    return replace(obj, ChunkRef, value_of)


def raise_error(exc: BaseException) -> None:
    """Stands in for a call that could not be packed (its error travels)."""
    raise exc


def run_spec(spec: TaskSpec, spill_dir: str | None = None) -> Any:
    """Run a whole spec in this process: the simplest possible worker entry."""
    if spec.command is not None:
        return run_command(spec.command, spec.uid, spec.name, spill_dir)
    assert spec.function is not None
    return call_function(
        spec.function, spec.args, spec.kwargs, spec.is_async, spec.name
    )
