"""The functions Dask runs on its workers.

Dask pickles them by reference, so a worker imports this module by its path,
``asyncflow.adapters.dask.worker``: keep them here, at module level.  They run
the task, and publish a small result to the client's topic (``push``) so that
the driver need not fetch it; ``kill_on_worker`` stops cancelled commands.
"""

from __future__ import annotations

import asyncio
import pickle
from typing import Any

from distributed import WorkerPlugin, get_worker

from ...commands import kill_command, run_command
from ...output import StdoutFile
from ...spec import Command
from ...worker import Call, call_pickled, run_chunk
from .values import SMALL, size_of, thaw

# Results up to this size (pickled) come back with the completion.
PUSH_BYTES = 4096
# A chunk's outcomes up to this size (pickled) too: a no-op chunk of 64 tasks
# takes a few kB.  The scheduler keeps the last 1,000 events of a topic, so
# this bounds what a backend's pushes hold there.
CHUNK_PUSH_BYTES = 32 * 1024
# How long a worker keeps looking for a cancelled command that has not started.
KILL_WATCH = 5.0
#: the tag of a pushed result, so the client can tell it from other events
EVENT = "asyncflow-result"


def run_function(
    topic: str | None,
    key: str,
    blob: bytes,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    is_async: bool,
    name: str,
) -> Any:
    try:
        value = call_pickled(blob, args, kwargs, is_async, name)
    except BaseException as exc:
        if _deep(exc.__traceback__):
            # Dask's client cannot rebuild a traceback this deep (a RecursionError
            # would never be reported); the formatted one is in the notes anyway.
            raise exc.with_traceback(None) from exc.__cause__
        raise
    push(topic, key, value)
    return value


def run_thawed_function(
    topic: str | None,
    key: str,
    blob: bytes,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    is_async: bool,
    name: str,
) -> Any:
    """:func:`run_function` for arguments holding frozensets that travelled as
    :class:`~.values.FrozenItems`, so that Dask resolved the futures in them."""
    return run_function(topic, key, blob, thaw(args), thaw(kwargs), is_async, name)


def run_chunk_task(topic: str | None, key: str, calls: list[Call]) -> Any:
    """:func:`~asyncflow.worker.run_chunk`, its outcomes pushed to the client
    when small enough (else the client gathers them)."""
    outcome = run_chunk(calls)
    if topic is not None:
        try:
            blob = pickle.dumps(outcome, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception:  # e.g. an array subclass: the client gathers it
            return outcome
        if len(blob) <= CHUNK_PUSH_BYTES:
            get_worker().log_event(topic, [EVENT, key, blob])
    return outcome


def _deep(tb: Any, limit: int = 200) -> bool:
    while tb is not None and limit:
        tb, limit = tb.tb_next, limit - 1
    return tb is not None


def run_command_task(
    topic: str | None, key: str, command: Command, uid: str, name: str
) -> str | bytes | StdoutFile:
    worker = get_worker()
    started = _COMMANDS.setdefault(worker.id, set())
    started.add(uid)
    try:
        # Output spills into the worker's own directory, which goes with it.
        value = run_command(command, uid, name, worker.local_directory)
    finally:
        started.discard(uid)
    push(topic, key, value)
    return value


#: worker id -> uids of the commands it runs (several in-process workers may
#: share this module)
_COMMANDS: dict[str, set[str]] = {}


class CommandReaper(WorkerPlugin):
    """Kills the commands a worker runs when that worker closes.

    A command has a session of its own, so nothing else stops it when its worker
    goes: not the nanny's SIGKILL after a slow close, and not a driver whose
    client was torn down with its event loop (Ctrl-C or SIGTERM in
    ``asyncio.run`` cancels the client's tasks before the adapter's cancel
    request can reach the worker).  Registered on clusters the adapter owns.
    """

    name = "asyncflow-command-reaper"

    def teardown(self, worker: Any) -> None:
        for uid in list(_COMMANDS.pop(worker.id, ())):
            kill_command(uid)


def push(topic: str | None, key: str, value: Any) -> None:
    """Publish a small result to the client; it stays on the worker as well."""
    if topic is None:
        return
    try:
        if type(value) not in SMALL and size_of(value) > PUSH_BYTES:
            return
        blob = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
        if len(blob) <= PUSH_BYTES:
            get_worker().log_event(topic, [EVENT, key, blob])
    except Exception:  # unpicklable here: the client fetches it the usual way
        pass


async def kill_on_worker(tasks: list[tuple[str, str]], dask_worker: Any = None) -> int:
    """Runs in every worker (``client.run``): kill the commands running here.

    A command this worker still holds (its thread may be about to start it) is
    looked for again until it starts or the worker lets go of it.
    """
    known = dask_worker.state.tasks
    loop = asyncio.get_running_loop()
    deadline = loop.time() + KILL_WATCH
    killed = 0
    while True:
        waiting = []
        for uid, key in tasks:
            if kill_command(uid):
                killed += 1
            elif key in known:
                waiting.append((uid, key))
        if not waiting or loop.time() > deadline:
            return killed
        tasks = waiting
        await asyncio.sleep(0.02)
