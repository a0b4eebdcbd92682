"""What runs in Parsl workers.

Parsl ships these module-level functions by reference, so a worker imports this
module by its path, ``asyncflow.adapters.parsl.worker``: keep them here.  Each
checks its task's cancel marker before it starts anything (see ``cancel``).  For
out-of-process executors a function task's function, arguments and result travel
as one pickled bytes object (:func:`packed_task`); exceptions lose their
traceback objects on the way back, and whatever cannot be pickled becomes a
SerializationError naming the task.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from typing import Any

import cloudpickle

from ...commands import run_command
from ...errors import SerializationError
from ...output import StdoutFile
from ...worker import call_function, call_pickled, run_chunk
from ..toolkit import portable
from .cancel import INPROC, Cancelled, command_slot, function_slot, is_cancelled


def command_task(
    command: Any,
    key: str,
    name: str,
    ctl: str | None,
    parsl_resource_specification: Any = None,
) -> str | bytes | StdoutFile:
    with command_slot(ctl, key):
        return run_command(command, key, name)


def inproc_task(
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    is_async: bool,
    name: str,
    key: str,
    parsl_resource_specification: Any = None,
) -> Any:
    if is_cancelled(INPROC, key):
        raise Cancelled(key)
    return call_function(fn, args, kwargs, is_async, name)


_PLAIN = frozenset({type(None), bool, int, float, str})

#: the largest pickled result a function task sends back through Parsl.  A
#: result goes from the worker to its manager, the interchange and the driver,
#: whole and in memory at each hop (a 512 MiB value peaks the driver at 3.6 GB);
#: at 2 GiB the manager, busy sending it, misses its heartbeats and is declared
#: lost.  Past the limit the task fails with a clear error instead.
RESULT_LIMIT = 512 * 2**20


def packed_task(packed: bytes, parsl_resource_specification: Any = None) -> Any:
    """Run a function task out of process; in and out travel as one bytes object.

    Parsl serialises arguments with dill, object by object; one pickled blob
    halves its per-task cost and leaves the choice of pickler to asyncflow.
    The traceback objects are dropped on the way back (the worker's traceback
    travels as a note): Parsl pickles them frame by frame, and a
    RecursionError's thousand frames kill the worker.
    """
    blob, args, kwargs, is_async, name, key, ctl = pickle.loads(packed)
    with function_slot(ctl, key):
        try:
            result = call_pickled(blob, args, kwargs, is_async, name)
        except BaseException as exc:
            raise portable(exc, name)  # noqa: B904 - keeps the cause chain
    if type(result) in _PLAIN:
        return result  # Parsl ships these faster than the bytes of their pickle
    data = _pickled(result, name)
    if len(data) > RESULT_LIMIT:
        raise _too_large(name, len(data))
    return data


def _too_large(name: str, size: int) -> SerializationError:
    return SerializationError(
        f"task {name!r}: its result is {size / 2**20:.0f} MiB pickled, more "
        f"than Parsl carries back ({RESULT_LIMIT // 2**20} MiB: each hop holds "
        "it whole in memory); write it to a file and return the path (declare "
        "it with asyncflow.OutputFile), or use Dask or Ray, which keep large "
        "values on the workers"
    )


def _pickled(result: Any, name: str) -> bytes:
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


def chunk_task(packed: bytes, parsl_resource_specification: Any = None) -> bytes:
    """Run several short function tasks as one Parsl task (see ``chunks``).

    ``run_chunk`` pickles every outcome on its own, so pickling the whole never
    fails and Parsl moves one bytes object each way.  A cancelled chunk is
    stopped like a function task: skipped if it has not started, its worker
    killed if it has.
    """
    calls, key, ctl = pickle.loads(packed)
    with function_slot(ctl, key):
        outcomes, spans, worker = run_chunk(calls)
    for i, (ok, value, pickled) in enumerate(outcomes):
        size = len(value) if pickled or isinstance(value, bytes | str) else 0
        # a later call may hold the value already (a chain run on in the chunk)
        if ok and size > RESULT_LIMIT and not any(c[4] for c in calls[i + 1 :]):
            outcomes[i] = (False, pickle.dumps(_too_large(calls[i][3], size)), True)
    return pickle.dumps((outcomes, spans, worker), protocol=5)
