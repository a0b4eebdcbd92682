"""Completions and fetches: how results come back from the cluster.

Every submitted future has a watcher waking on the future's own event.  A small
result was pushed by the worker just before (see ``worker._push``) and is
reported as a plain value; a bigger one is reported as a DaskRemoteValue and
fetched only when awaited, the fetches of one loop turn sharing one
``client.gather`` (at most ``MAX_GATHERS`` in flight).
"""

from __future__ import annotations

import asyncio
import pickle
from typing import Any

from distributed import Future
from distributed.scheduler import KilledWorker

from ...errors import EngineClosedError
from .base import _DaskBase
from .errors import _fetch_error, _translate
from .values import DaskRemoteValue
from .worker import _EVENT

# Fetches in flight at once; requests arriving meanwhile form the next batch.
MAX_GATHERS = 2


class _Failure:
    __slots__ = ("exc",)

    def __init__(self, exc: BaseException):
        self.exc = exc


async def _capture(aw: Any) -> Any:
    try:
        return await aw
    except Exception as exc:
        return _Failure(exc)


class _ResultsMixin(_DaskBase):
    """Watching submitted futures, and fetching values left on the workers."""

    # -- completions ---------------------------------------------------------------
    def _on_event(self, event: tuple[float, Any]) -> None:
        """A small result published by a worker (see ``_push``); it arrives just
        before the task's completion, on the same stream."""
        msg = event[1]
        if type(msg) in (list, tuple) and len(msg) == 3 and msg[0] == _EVENT:
            key, blob = msg[1], msg[2]
            if isinstance(blob, bytes) and key in self._keys:
                self._pushed[key] = blob

    async def _watch(self, uid: str, name: str, fut: Future) -> None:
        exc = await fut.exception()
        if self._plan is not None and isinstance(exc, KilledWorker):
            await self._why_lost()  # a job ending names its reason, cancelling this
        tracked = self._tasks.pop(uid, None)
        if tracked is None:
            return  # cancelled meanwhile
        self._keys.discard(tracked.key)
        blob = self._pushed.pop(tracked.key, None)
        sink = self._sink
        assert sink is not None
        if exc is None and fut.status == "finished":
            if blob is not None:
                try:
                    value = pickle.loads(blob)
                except Exception:  # e.g. a class the driver cannot import
                    pass
                else:
                    sink.set_result(uid, value)
                    return
            sink.set_result(uid, DaskRemoteValue(self, fut))
            return
        sink.set_exception(uid, _translate(exc, name, fut))

    # -- remote values -------------------------------------------------------------
    def _fetch(self, fut: Future) -> asyncio.Future[Any]:
        if self._closed or self._loop is None:
            raise EngineClosedError(
                f"the value of Dask task {fut.key!r} stayed on the cluster, and the "
                "backend was shut down before anyone awaited it; await results "
                "before the engine shuts down"
            )
        waiter = self._loop.create_future()
        self._fetch_queue.append((fut, waiter))
        if not self._fetch_scheduled and self._gathering < MAX_GATHERS:
            self._fetch_scheduled = True
            self._loop.call_soon(self._flush_fetches)
        return waiter

    def _flush_fetches(self) -> None:
        self._fetch_scheduled = False
        if not self._fetch_queue or self._closed or self._gathering >= MAX_GATHERS:
            return
        batch, self._fetch_queue = self._fetch_queue, []
        self._gathering += 1
        self._spawn(self._gather(batch))

    async def _gather(self, batch: list[tuple[Future, asyncio.Future[Any]]]) -> None:
        """One ``client.gather`` for everything asked for in one loop turn (or
        while the previous gathers ran)."""
        try:
            values = await self._gather_values([f for f, _ in batch])
        except BaseException as exc:  # cancelled at shutdown
            for _, waiter in batch:
                if not waiter.done():
                    waiter.set_exception(
                        EngineClosedError(
                            f"the Dask backend shut down while fetching ({exc!r})"
                        )
                    )
            raise
        finally:
            self._gathering -= 1
            if self._fetch_queue and not self._fetch_scheduled and not self._closed:
                self._fetch_scheduled = True
                assert self._loop is not None
                self._loop.call_soon(self._flush_fetches)
        for (fut, waiter), value in zip(batch, values, strict=True):
            if waiter.done():
                continue
            if isinstance(value, _Failure):
                waiter.set_exception(_fetch_error(value.exc, fut))
            else:
                waiter.set_result(value)

    async def _gather_values(self, futures: list[Future]) -> list[Any]:
        client = self._client
        assert client is not None
        try:
            return list(await client.gather(futures))
        except Exception as exc:
            if len(futures) == 1:
                return [_Failure(exc)]
            # Which one failed?  Ask each; the others are in memory.
            return list(
                await asyncio.gather(*(_capture(client.gather(f)) for f in futures))
            )
