"""Exceptions fit for the trip back from a worker, and the errors for loss.

A task's own exception must reach the caller as its own type.  On the way it
crosses a pickler that may choke on traceback objects (a RecursionError's
thousand frames exceed the recursion limit when pickled frame by frame, as
Parsl and tblib do) or on the exception itself (one holding a lock).  What
cannot travel is replaced by a :class:`SerializationError` that says what it
was, so that the failure is never lost.
"""

from __future__ import annotations

import pickle

import cloudpickle

from ...errors import SerializationError, WorkerLostError


def strip_tracebacks(exc: BaseException) -> None:
    """Drop the traceback objects of ``exc`` and of its causes and contexts.

    The worker's traceback already travels as text in the exception's note
    (see :func:`asyncflow.worker.call_function`)."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        cur.__traceback__ = None
        cur = cur.__cause__ or cur.__context__


def portable(exc: BaseException, name: str) -> BaseException:
    """``exc`` without tracebacks, or a SerializationError if it cannot pickle."""
    strip_tracebacks(exc)
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


def is_pickling_error(exc: BaseException) -> bool:
    """Whether a runtime's error means "this value cannot be serialised".

    Runtimes report it as pickle's own error or as a TypeError, AttributeError
    or ValueError whose text says so; nothing narrower is reliable."""
    if isinstance(exc, pickle.PicklingError):
        return True
    text = f"{type(exc).__name__} {exc}".lower()
    return isinstance(exc, TypeError | AttributeError | ValueError) and (
        "pickle" in text or "serializ" in text
    )


def lost_error(name: str, message: str) -> WorkerLostError:
    """A task whose batch job ended under it (``message`` says how)."""
    hint = (
        "ask for a longer 'walltime' in the dict, or split the work"
        if "walltime" in message
        else "retry it (retries=...) or look at the job's log"
    )
    return WorkerLostError(f"task {name!r}: {message}; {hint}")
