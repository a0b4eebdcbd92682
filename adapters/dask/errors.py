"""Dask's failures, translated into asyncflow's errors.

Dask reports a lost worker, a dropped task, an unpicklable value or a cluster
that would not start in its own terms; the engine and its users expect
WorkerLostError, SerializationError and BackendStartError with a hint at the
fix.  Kept in one place so that submission, completions and fetches agree.
"""

from __future__ import annotations

import asyncio
from typing import Any

from distributed import Future
from distributed.scheduler import KilledWorker

from ...errors import (
    BackendStartError,
    EngineClosedError,
    SerializationError,
    WorkerLostError,
)
from ..toolkit import is_pickling_error


def task_error(exc: BaseException | None, name: str, fut: Future) -> BaseException:
    """What a task whose Dask future did not finish fails with."""
    if isinstance(exc, KilledWorker):
        return WorkerLostError(
            f"task {name!r}: the Dask worker running it died ({exc})"
        )
    if exc is None or fut.cancelled() or isinstance(exc, asyncio.CancelledError):
        reason = getattr(exc, "reason", None) or getattr(
            getattr(fut, "_state", None), "exception", None
        )
        return WorkerLostError(
            f"task {name!r}: Dask dropped it ({reason or 'cancelled'}); was the "
            "scheduler restarted or the connection to it lost?"
        )
    return exc


def fetch_error(exc: BaseException, fut: Future) -> BaseException:
    """What awaiting a value left on the cluster fails with."""
    if isinstance(exc, KilledWorker | asyncio.CancelledError):
        return WorkerLostError(
            f"the value of Dask task {fut.key!r} was lost with its worker ({exc})"
        )
    if is_pickling_error(exc):
        err = SerializationError(
            f"the result of Dask task {fut.key!r} cannot be serialised "
            f"({type(exc).__name__}: {exc}); return plain data"
        )
        err.__cause__ = exc
        return err
    return exc


def start_error(exc: Exception, target: Any, owned: bool) -> Exception:
    """A failed start, saying which runtime would not come up and why."""
    if isinstance(exc, BackendStartError | EngineClosedError):
        return exc
    if owned:
        hint = ""
        if "Nanny failed to start" in str(exc) or "bootstrapping phase" in str(exc):
            hint = (
                " (a script that starts a process cluster needs the "
                "`if __name__ == '__main__':` guard)"
            )
        return BackendStartError(
            f"could not start a Dask LocalCluster: {type(exc).__name__}: {exc}{hint}"
        )
    where = target if isinstance(target, str) else repr(target)
    return BackendStartError(
        f"could not connect to the Dask scheduler at {where}: "
        f"{type(exc).__name__}: {exc}; is `dask scheduler` running there?"
    )


def submit_error(name: str, exc: Exception) -> BaseException:
    """``client.map`` refused a task: Dask's pickling failures, made to say
    what to change."""
    if not is_pickling_error(exc):
        return exc
    err = SerializationError(
        f"task {name!r}: an argument cannot be serialised for Dask "
        f"({type(exc).__name__}: {exc}); pass plain data, or define its "
        "types at module level"
    )
    err.__cause__ = exc
    return err
