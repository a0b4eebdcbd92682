"""Completions and fetches: how results come back from Ray.

Ray's readiness callback (the one behind ``await ref``) fires on Ray's thread
without fetching the value; completions are batched onto the event loop, small
values and errors read from the driver's memory in one ``ray.get`` per batch,
and a value in the shared-memory store reported as a :class:`RayValue`, fetched
only when awaited (the fetches of one loop turn share one ``ray.get``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from typing import Any, cast

import ray
import ray.exceptions as rex
from ray.experimental import get_local_object_locations

from ..._util import run_in_thread
from ...errors import EngineClosedError, SerializationError, WorkerLostError
from ...protocol import ExecutionBackend, RemoteValue
from ..toolkit import BatchedFetch, Failed
from .errors import task_error
from .state import BATCH, RayState, RayTask, log

__all__ = ["Completions", "RayValue"]

_INLINE_LIMIT = 100 * 1024  # Ray's max_direct_call_object_size
_PEEK_LIMIT = 1024 * 1024  # results up to this size are read once to spot errors
_BATCH_DELAY = 0.05  # seconds a small batch may wait while every worker has a queue


class RayValue(RemoteValue):
    """A task result kept in Ray's object store; ``handle`` is its ObjectRef."""

    __slots__ = ("_source",)

    def __init__(
        self,
        owner: ExecutionBackend,
        handle: ray.ObjectRef,
        source: BatchedFetch[ray.ObjectRef],
    ):
        super().__init__(owner, handle)
        self._source = source  # the owner's fetches, batched per loop turn

    async def fetch(self) -> Any:
        return await self._source.fetch(self.handle)


class Completions:
    """Readiness callbacks, batched reports, and fetches of remote values.

    ``owner`` is the backend the RayValues made here belong to.
    """

    def __init__(self, state: RayState, owner: ExecutionBackend):
        self._state = state
        self._owner = owner
        self._ready: collections.deque[str] = collections.deque()  # Ray's threads
        self._drain_scheduled = False
        self._deferred = False
        self._fetches: BatchedFetch[ray.ObjectRef] = BatchedFetch(
            _get_many, _fetch_error, log
        )

    def _value(self, ref: ray.ObjectRef) -> RayValue:
        return RayValue(self._owner, ref, self._fetches)

    async def close(self) -> None:
        """Fail the fetches still waiting; those in flight end first."""
        await self._fetches.close(EngineClosedError("the Ray backend was shut down"))

    # -- on Ray's threads -----------------------------------------------------------
    def on_ready(self, uid: str, _exc: BaseException | None) -> None:
        """On Ray's thread: the task's return object exists (value or error)."""
        self._ready.append(uid)
        if not self._drain_scheduled:
            self._drain_scheduled = True
            loop = self._state.life.loop
            assert loop is not None
            with contextlib.suppress(RuntimeError):  # the loop is closed
                loop.call_soon_threadsafe(self._drain)

    def on_client_response(self, uid: str, resp: Any) -> None:
        """On Ray Client's data thread (``ray://``): the proxy has no object
        store here, so the value (or the task's error) comes with the completion.

        Ray's own ``_on_completed`` hands its callback whatever it gets, and when
        the connection drops for good (after Ray Client's reconnect grace) that
        is a ``ConnectionError`` object, indistinguishable from a task that
        returned one.  Reading the raw response here tells them apart.
        """
        state = self._state
        if state.life.closed:
            return  # our own disconnect at shutdown fails every pending get
        task = state.tasks.pop(uid, None)
        if task is None:
            state.cancelled.pop(uid, None)
            return
        sink = state.sink
        assert sink is not None
        if isinstance(resp, Exception):
            state.lost = (
                f"the Ray Client connection to {state.address} dropped ({resp}); "
                "check that the head is up and reachable, then run the workflow "
                "again"
            )
            sink.set_exception(
                uid, WorkerLostError(f"task {task.name!r}: {state.lost}")
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
            state.failed.add(uid)
            sink.set_exception(uid, task_error(task.name, value))
        else:
            sink.set_result(uid, value)

    # -- on the loop ----------------------------------------------------------------
    def _drain(self) -> None:
        """Report every task that became ready since the last turn, unless a
        short wait would batch more of them at nobody's expense."""
        state = self._state
        if state.life.closed:
            # After shutdown every call into Ray is off limits: with the owned
            # Ray gone, ray.get() would start a new one.
            self._ready.clear()
            self._drain_scheduled = self._deferred = False
            return
        waiting = len(self._ready)
        if (
            not self._deferred
            and waiting < BATCH
            and len(state.tasks) - waiting >= state.backlog
        ):
            # Every worker has queued work behind the running task, so reporting
            # a little later idles nobody, while each wake-up and ray.get here
            # costs the driver about as much CPU as a task submission.  Collect
            # the completions of the next few milliseconds into one batch.  (A
            # chain, or anything with little queued, is never delayed.)
            self._deferred = True
            assert state.life.loop is not None
            state.life.loop.call_later(_BATCH_DELAY, self._drain)
            return
        self._deferred = False
        self._drain_scheduled = False
        done = self._take()
        if done:
            self._report(done)

    def _take(self) -> list[tuple[str, RayTask]]:
        """The ready tasks still in flight; cancelled ones' errors are read and
        dropped, so that Ray does not log them."""
        state = self._state
        ready = self._ready
        uids = []
        while ready:
            uids.append(ready.popleft())
        done: list[tuple[str, RayTask]] = []
        dropped: list[ray.ObjectRef] = []
        for uid in uids:
            task = state.tasks.pop(uid, None)
            if task is not None:
                done.append((uid, task))
            else:
                ref = state.cancelled.pop(uid, None)
                if ref is not None:
                    dropped.append(ref)
        if dropped:
            _get_now(dropped)
        return done

    def _report(self, done: list[tuple[str, RayTask]]) -> None:
        """Small values (and errors) were sent back inline and sit in this
        process's memory, so one ``ray.get`` for the batch returns at once.  A
        value Ray placed in its shared-memory store (over 100 KiB) stays there:
        the engine gets a RayValue for it."""
        sink = self._state.sink
        assert sink is not None
        locations = get_local_object_locations([task.ref for _, task in done])
        read: list[tuple[str, RayTask, bool]] = []
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
                sink.set_result(uid, self._value(task.ref))
        if not read:
            return
        outcomes = _get_now([task.ref for _, task, _ in read])
        for (uid, task, inline), value in zip(read, outcomes, strict=True):
            if not isinstance(value, Failed):
                sink.set_result(uid, value if inline else self._value(task.ref))
            elif isinstance(value.exc, rex.GetTimeoutError):  # pragma: no cover
                # Not actually local yet: let a fetch wait for it off the loop.
                sink.set_result(uid, self._value(task.ref))
            else:
                self._state.failed.add(uid)
                sink.set_exception(uid, task_error(task.name, value.exc))


def _client_loads(resp: Any) -> Any:
    """A Ray Client get response's value, or the task's error, as an object."""
    from ray.util.client.client_pickler import loads_from_server

    if isinstance(resp, bytearray):  # a value that came in chunks, reassembled
        return loads_from_server(cast(bytes, resp))  # no copy: pickle reads it
    got = resp.get
    return loads_from_server(got.data if got.valid else got.error)


def _get_all(refs: list[ray.ObjectRef], timeout: float | None) -> list[Any]:
    """Values of ``refs``, each failure as a Failed in its place."""
    try:
        return list(ray.get(refs, timeout=timeout))
    except Exception:
        pass
    out: list[Any] = []
    for ref in refs:
        try:
            out.append(ray.get(ref, timeout=timeout))
        except Exception as exc:
            out.append(Failed(exc))
    return out


def _get_now(refs: list[ray.ObjectRef]) -> list[Any]:
    """Values of ready, local objects, without waiting."""
    return _get_all(refs, 0)


async def _get_many(refs: list[ray.ObjectRef]) -> list[Any]:
    """One batch of fetches, off the loop.  Cancelled (the backend shutting
    down), it still waits for its thread: Ray must not be shut down under a
    ``ray.get`` in flight."""
    thread = asyncio.ensure_future(
        run_in_thread(_get_all, refs, None, name="asyncflow-ray-fetch")
    )
    try:
        return await asyncio.shield(thread)
    except asyncio.CancelledError:
        with contextlib.suppress(BaseException):
            await thread
        raise


def _fetch_error(exc: BaseException, _ref: ray.ObjectRef) -> BaseException:
    return task_error("(fetch)", exc) if isinstance(exc, rex.RayError) else exc
