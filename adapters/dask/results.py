"""Completions and fetches: how results come back from the cluster.

Every submitted future has a watcher waking on the future's own event.  A small
result was pushed by the worker just before (see ``worker.push``) and is
reported as a plain value; a bigger one is reported as a DaskRemoteValue and
fetched only when awaited, the fetches of one loop turn sharing one
``client.gather`` (at most ``MAX_GATHERS`` in flight).
"""

from __future__ import annotations

import asyncio
import pickle
from collections.abc import Awaitable, Callable
from typing import Any

from distributed import Future
from distributed.scheduler import KilledWorker

from ...errors import EngineClosedError
from ..toolkit import BatchedFetch, Failed, lost_error
from .errors import fetch_error, task_error
from .state import DaskState, log
from .values import DaskRemoteValue
from .worker import EVENT

# Fetches in flight at once; requests arriving meanwhile form the next batch.
MAX_GATHERS = 2


async def _capture(aw: Awaitable[Any]) -> Any:
    try:
        return await aw
    except Exception as exc:
        return Failed(exc)


class Completions:
    """Watching submitted futures, and fetching values left on the workers.

    ``why_lost`` is awaited before reporting a task whose worker died: an
    allocation's jobs may be ending, and the task should fail naming why."""

    def __init__(
        self,
        state: DaskState,
        why_lost: Callable[[], Awaitable[str | None]] | None = None,
    ):
        self._state = state
        self._why_lost = why_lost
        self._fetches: BatchedFetch[Future] = BatchedFetch(
            self._gather, fetch_error, log, limit=MAX_GATHERS
        )

    # -- completions ---------------------------------------------------------------
    def on_event(self, event: tuple[float, Any]) -> None:
        """A small result published by a worker (see ``push``); it arrives just
        before the task's completion, on the same stream."""
        msg = event[1]
        if type(msg) in (list, tuple) and len(msg) == 3 and msg[0] == EVENT:
            key, blob = msg[1], msg[2]
            if isinstance(blob, bytes) and key in self._state.keys:
                self._state.pushed[key] = blob

    async def watch(self, uid: str, name: str, fut: Future) -> None:
        exc = await fut.exception()
        why = None
        if self._why_lost is not None and isinstance(exc, KilledWorker):
            why = await self._why_lost()  # the batch job that took its worker
        state = self._state
        tracked = state.forget(uid)
        if tracked is None:
            return  # cancelled meanwhile
        blob = state.pushed.pop(tracked.key, None)
        sink = state.sink
        assert sink is not None
        if why is not None:
            sink.set_exception(uid, lost_error(name, why))
            return
        if exc is None and fut.status == "finished":
            if blob is not None:
                try:
                    value = pickle.loads(blob)
                except Exception:  # e.g. a class the driver cannot import
                    pass
                else:
                    sink.set_result(uid, value)
                    return
            sink.set_result(uid, self.remote(fut))
            return
        sink.set_exception(uid, task_error(exc, name, fut))

    # -- remote values -------------------------------------------------------------
    def remote(self, fut: Future) -> DaskRemoteValue:
        """``fut``'s value, left on the cluster until someone awaits it."""
        return DaskRemoteValue(self._state.owner, fut, self.fetch)

    def fetch(self, fut: Future) -> asyncio.Future[Any]:
        life = self._state.life
        if life.closed or life.loop is None:
            raise EngineClosedError(
                f"the value of Dask task {fut.key!r} stayed on the cluster, and the "
                "backend was shut down before anyone awaited it; await results "
                "before the engine shuts down"
            )
        return self._fetches.fetch(fut)

    async def _gather(self, futures: list[Future]) -> list[Any]:
        """One ``client.gather`` for a batch; if it fails, one per future, to
        tell which failed (the others are in memory)."""
        client = self._state.client
        assert client is not None
        try:
            return list(await client.gather(futures))
        except Exception as exc:
            if len(futures) == 1:
                return [Failed(exc)]
            return list(
                await asyncio.gather(*(_capture(client.gather(f)) for f in futures))
            )

    async def close(self) -> None:
        """Fail the fetches still waiting: the client they wait on is closing."""
        await self._fetches.close(EngineClosedError("the Dask backend shut down"))
        self._state.pushed.clear()
