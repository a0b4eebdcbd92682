"""Function tasks in raptor: the envelope both ways, and the worker class.

Raptor alone is not enough for asyncflow's promises.  It reports a raised
exception only as its ``repr`` (the type and traceback are lost), and it calls
task functions inside a running event loop, where an ``async def`` task could
not be run with ``asyncio.run``.  So every function task is sent as a call to
:func:`call_remote`, which runs the task in a thread of its own and returns a
cloudpickled ``(ok, value)`` envelope that :func:`unpack_result` opens in the
driver.
"""

from __future__ import annotations

import base64
import importlib
import sys
import threading
from collections.abc import Sequence
from typing import Any

import cloudpickle

from ...errors import SerializationError
from ...spec import TaskSpec
from ...worker import call_function
from ._rp import rp, ru

__all__ = ["AsyncflowWorker", "call_remote", "pack_call", "unpack_result"]

#: what the adapter writes as the raptor worker's ``raptor_file``
WORKER_FILE = "from asyncflow.adapters.radical.worker import AsyncflowWorker\n"


def pack_call(spec: TaskSpec) -> bytes:
    """Pickle the call in the driver, so that an unpicklable task fails at once."""
    try:
        return cloudpickle.dumps((spec.function, spec.args, spec.kwargs, spec.is_async))
    except Exception as exc:
        raise SerializationError(
            f"task {spec.name!r}: its function or arguments cannot be serialised "
            f"for a raptor worker ({type(exc).__name__}: {exc}); define the function "
            "at module level and do not capture locks, sockets or open files"
        ) from exc


def call_remote(paths: Sequence[str], name: str, payload: bytes) -> str:
    """Runs inside a raptor worker: call the task, return a pickled envelope."""
    for p in paths:  # the driver's modules, for functions pickled by reference
        if p not in sys.path:
            sys.path.append(p)
    box: list[tuple[bool, Any]] = []

    def run() -> None:
        try:
            fn, args, kwargs, is_async = cloudpickle.loads(payload)
        except BaseException as exc:
            box.append((False, _unpicklable(name, exc)))
            return
        try:
            box.append((True, call_function(fn, args, kwargs, is_async, name)))
        except BaseException as exc:
            box.append((False, exc))

    th = threading.Thread(target=run, name="asyncflow-task")
    th.start()
    th.join()
    try:
        blob = cloudpickle.dumps(box[0])
    except Exception as exc:
        what = "result" if box[0][0] else f"exception {box[0][1]!r}"
        blob = cloudpickle.dumps(
            (
                False,
                SerializationError(
                    f"task {name!r}: its {what} cannot be pickled "
                    f"({type(exc).__name__}: {exc}); return plain data"
                ),
            )
        )
    # base64: raptor moves the return value through JSON-based messages
    return base64.b64encode(blob).decode("ascii")


def _unpicklable(name: str, exc: BaseException) -> SerializationError:
    return SerializationError(
        f"task {name!r}: it cannot be unpickled in the raptor worker "
        f"({type(exc).__name__}: {exc}); the worker must be able to import "
        "every module the function refers to"
    )


def unpack_result(name: str, envelope: Any) -> tuple[bool, Any]:
    """The ``(ok, value)`` that :func:`call_remote` returned, in the driver."""
    try:
        ok, value = cloudpickle.loads(base64.b64decode(envelope))
    except Exception as exc:
        return False, SerializationError(
            f"task {name!r}: its result cannot be unpickled in the driver "
            f"({type(exc).__name__}: {exc})"
        )
    return bool(ok), value


class AsyncflowWorker(rp.raptor.DefaultWorker):
    """radical.pilot's DefaultWorker, minus the imports in every task.

    DefaultWorker forks a fresh process per task, so a function pickled by
    reference would import its module (and whatever that imports) every time:
    for the conformance tasks that meant importing pytest per task, about one
    task a second.  This worker imports asyncflow once, by being defined here,
    and each task's module once, in the long-lived worker process, before
    forking.
    """

    def _request_cb(self, tasks: Any) -> Any:
        for task in ru.as_list(tasks):
            meta = (task.get("description") or {}).get("metadata") or {}
            for p in meta.get("asyncflow_path") or ():
                if p not in sys.path:
                    sys.path.append(p)
            for name in meta.get("asyncflow_modules") or ():
                if name not in sys.modules and name not in _FAILED_IMPORTS:
                    try:
                        importlib.import_module(name)
                    except BaseException:  # the task itself will report it
                        _FAILED_IMPORTS.add(name)
        return super()._request_cb(tasks)


_FAILED_IMPORTS: set[str] = set()
