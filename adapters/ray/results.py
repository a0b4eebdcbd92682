"""Completions and fetches: how results come back from Ray.

Ray's readiness callback (the one behind ``await ref``) fires on Ray's thread
without fetching the value; completions are batched onto the event loop, small
values and errors read from the driver's memory in one ``ray.get`` per batch,
and a value in the shared-memory store reported as a :class:`RayValue`, fetched
only when awaited (the fetches of one loop turn share one ``ray.get``).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, cast

import ray
import ray.exceptions as rex
from ray.experimental import get_local_object_locations

from ..._util import run_in_thread
from ...errors import SerializationError, WorkerLostError
from ...protocol import RemoteValue
from .base import _RayBase, _Task
from .errors import _task_error

_INLINE_LIMIT = 100 * 1024  # Ray's max_direct_call_object_size
_PEEK_LIMIT = 1024 * 1024  # results up to this size are read once to spot errors
_BATCH = 32  # completions worth one ray.get at once
_BATCH_DELAY = 0.05  # seconds a small batch may wait while every worker has a queue


class RayValue(RemoteValue):
    """A task result kept in Ray's object store; ``handle`` is its ObjectRef."""

    __slots__ = ()

    async def fetch(self) -> Any:
        owner = self.owner
        assert isinstance(owner, _ResultsMixin)
        return await owner._fetch(self.handle)


class _ResultsMixin(_RayBase):
    """Readiness callbacks, batched reports, and fetches of remote values."""

    # -- completions ----------------------------------------------------------
    def _on_ready(self, uid: str, _exc: BaseException | None) -> None:
        """On Ray's thread: the task's return object exists (value or error)."""
        self._ready_uids.append(uid)
        if not self._drain_scheduled:
            self._drain_scheduled = True
            assert self._loop is not None
            with contextlib.suppress(RuntimeError):  # the loop is closed
                self._loop.call_soon_threadsafe(self._drain)

    def _on_client_response(self, uid: str, resp: Any) -> None:
        """On Ray Client's data thread (``ray://``): the proxy has no object
        store here, so the value (or the task's error) comes with the completion.

        Ray's own ``_on_completed`` hands its callback whatever it gets, and when
        the connection drops for good (after Ray Client's reconnect grace) that
        is a ``ConnectionError`` object, indistinguishable from a task that
        returned one.  Reading the raw response here tells them apart.
        """
        if self._closed:
            return  # our own disconnect at shutdown fails every pending get
        task = self._tasks.pop(uid, None)
        if task is None:
            self._cancelled.pop(uid, None)
            return
        sink = self._sink
        assert sink is not None
        if isinstance(resp, Exception):
            self._lost = (
                f"the Ray Client connection to {self._address} dropped ({resp}); "
                "check that the head is up and reachable, then run the workflow "
                "again"
            )
            sink.set_exception(
                uid, WorkerLostError(f"task {task.name!r}: {self._lost}")
            )
            return
        try:
            value = _client_loads(resp)
        except Exception as exc:
            sink.set_exception(
                uid,
                SerializationError(
                    f"task {task.name!r}: its result cannot be deserialised here "
                    f"({type(exc).__name__}: {exc}); make the result's types "
                    "importable on the client"
                ),
            )
            return
        if isinstance(value, rex.RayError):
            sink.set_exception(uid, _task_error(task.name, value))
        else:
            sink.set_result(uid, value)

    def _drain(self) -> None:
        """On the loop: report every task that became ready since the last turn.

        Small values (and errors) were sent back inline and sit in this
        process's memory, so one ``ray.get`` for the batch returns at once.  A
        value Ray placed in its shared-memory store (over 100 KiB) stays there:
        the engine gets a RayValue for it.
        """
        ready = self._ready_uids
        if self._closed:
            # After shutdown every call into Ray is off limits: with the owned
            # Ray gone, ray.get() would start a new one.
            ready.clear()
            self._drain_scheduled = self._deferred = False
            return
        if (
            not self._deferred
            and len(ready) < _BATCH
            and len(self._tasks) - len(ready) >= self._backlog
        ):
            # Every worker has queued work behind the running task, so reporting
            # a little later idles nobody, while each wake-up and ray.get here
            # costs the driver about as much CPU as a task submission.  Collect
            # the completions of the next few milliseconds into one batch.  (A
            # chain, or anything with little queued, is never delayed.)
            self._deferred = True
            assert self._loop is not None
            self._loop.call_later(_BATCH_DELAY, self._drain)
            return
        self._deferred = False
        self._drain_scheduled = False
        uids = []
        while ready:
            uids.append(ready.popleft())
        done: list[tuple[str, _Task]] = []
        dropped: list[ray.ObjectRef] = []
        for uid in uids:
            task = self._tasks.pop(uid, None)
            if task is not None:
                done.append((uid, task))
            else:
                ref = self._cancelled.pop(uid, None)
                if ref is not None:
                    dropped.append(ref)
        if dropped:
            _get_now(dropped)  # read the errors so Ray does not log them
        if not done:
            return
        sink = self._sink
        assert sink is not None
        locations = get_local_object_locations([task.ref for _, task in done])
        read: list[tuple[str, _Task, bool]] = []
        for uid, task in done:
            where = locations.get(task.ref) or {}
            size = where.get("object_size") or 0
            if not where.get("node_ids") and size <= _INLINE_LIMIT:
                read.append((uid, task, True))
            elif size <= _PEEK_LIMIT:
                # In the shared store but small: most likely a value, yet an
                # error with a long message lands here too.  Reading it once is
                # cheap and keeps failures failures; the value stays remote.
                read.append((uid, task, False))
            else:
                sink.set_result(uid, RayValue(self, task.ref))
        if not read:
            return
        outcomes = _get_now([task.ref for _, task, _ in read])
        for (uid, task, inline), (ok, value) in zip(read, outcomes, strict=True):
            if ok:
                sink.set_result(uid, value if inline else RayValue(self, task.ref))
            elif isinstance(value, rex.GetTimeoutError):  # pragma: no cover
                # Not actually local yet: let a fetch wait for it off the loop.
                sink.set_result(uid, RayValue(self, task.ref))
            else:
                sink.set_exception(uid, _task_error(task.name, value))

    # -- fetch ----------------------------------------------------------------
    async def _fetch(self, ref: ray.ObjectRef) -> Any:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        if not self._fetches:
            loop.call_soon(self._flush_fetches)
        self._fetches.append((ref, fut))
        return await fut

    def _flush_fetches(self) -> None:
        batch, self._fetches = self._fetches, []
        if batch:
            self._spawn(self._fetch_batch(batch))

    async def _fetch_batch(
        self, batch: list[tuple[ray.ObjectRef, asyncio.Future[Any]]]
    ) -> None:
        try:
            outcomes = await run_in_thread(
                _get_many, [r for r, _ in batch], name="asyncflow-ray-fetch"
            )
        except BaseException as exc:
            outcomes = [(False, exc)] * len(batch)
        for (_, fut), (ok, value) in zip(batch, outcomes, strict=True):
            if fut.done():
                continue
            if ok:
                fut.set_result(value)
            else:
                fut.set_exception(
                    _task_error("(fetch)", value)
                    if isinstance(value, rex.RayError)
                    else value
                )


def _client_loads(resp: Any) -> Any:
    """A Ray Client get response's value, or the task's error, as an object."""
    from ray.util.client.client_pickler import loads_from_server

    if isinstance(resp, bytearray):  # a value that came in chunks, reassembled
        return loads_from_server(cast(bytes, resp))  # no copy: pickle reads it
    got = resp.get
    return loads_from_server(got.data if got.valid else got.error)


def _get_now(refs: list[ray.ObjectRef]) -> list[tuple[bool, Any]]:
    """Values of ready, local objects, without waiting; errors as values."""
    try:
        return [(True, v) for v in ray.get(refs, timeout=0)]
    except Exception:
        pass
    out: list[tuple[bool, Any]] = []
    for ref in refs:
        try:
            out.append((True, ray.get(ref, timeout=0)))
        except Exception as exc:
            out.append((False, exc))
    return out


def _get_many(refs: list[ray.ObjectRef]) -> list[tuple[bool, Any]]:
    try:
        return [(True, v) for v in ray.get(refs)]
    except Exception:
        pass
    out: list[tuple[bool, Any]] = []
    for ref in refs:
        try:
            out.append((True, ray.get(ref)))
        except Exception as exc:
            out.append((False, exc))
    return out
