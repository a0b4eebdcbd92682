"""Short function tasks several to a Dask task (see :mod:`..toolkit.chunks`).

Each Dask task costs the scheduler its graph update, its transitions and a
completion message to the client: a millisecond or so of scheduler CPU, which
is all of a no-op's run, and the scheduler is one process for the whole
cluster.  So when one batch holds many calls of one function (a fan-out, a
sweep, a chain called in one go), those calls go through a chunk queue: several
to one Dask task, sized to a few milliseconds of measured work, with a chain's
hops fused to run on inside one worker.  Everything else keeps Dask's path,
where a result stays on the workers until needed and data moves worker to
worker: small batches, tasks with resources or Dask ``options=``, arguments big
enough to be scattered, and tasks taking a value the cluster holds.  A chunk's
outcomes come back to the driver (pushed with its completion when small, see
``worker.run_chunk_task``, else in a batched gather), which is why a task
reading a Dask value is never chunked.

The client is asynchronous and belongs to the event loop.  Chunks are submitted
from a loop callback of their own rather than inside the queue's call: a chunk
that fails at once reports, and so sends the next one, and a run of those would
otherwise recurse.  A chunk's future here is a stand-in, resolved by a watcher
on the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import pickle
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Future
from typing import Any

from distributed import Future as DaskFuture
from distributed.scheduler import KilledWorker

from ...errors import WorkerLostError
from ...protocol import CompletionSink
from ...spec import TaskSpec
from ...walk import contains
from ...worker import Call
from ..toolkit import FunctionCache, lost_error
from ..toolkit.chunks import ChunkQueue
from ..toolkit.routing import MIN_BURST, route
from .config import CLOSE_TIMEOUT
from .results import Completions
from .state import DaskState, WorkerCapacity, log
from .submit import SCATTER_BYTES, SCATTER_EACH, SUBMIT_OPTIONS
from .values import DaskRemoteValue, payload
from .worker import run_chunk_task

__all__ = ["DaskChunks", "JobLost"]

_VALUES = frozenset({DaskRemoteValue})

_Out = tuple[str, DaskFuture, "asyncio.Task[None]"]  # key, Dask future, watcher


class JobLost(Exception):
    """An allocation's job ended under a chunk; the message says how."""


class DaskChunks:
    """The chunk queue of one Dask backend, and what decides who uses it.

    ``functions`` is the submitter's cache, so a function is pickled once for
    both paths; ``why_lost`` is the allocation's (see ``results``)."""

    def __init__(
        self,
        state: DaskState,
        completions: Completions,
        functions: FunctionCache,
        why_lost: Callable[[], Awaitable[str | None]] | None,
        enabled: bool,
    ):
        self._state = state
        self._completions = completions
        self._functions = functions
        self._why_lost = why_lost
        self.enabled = enabled
        #: calls of one function in a batch from which they are chunked (set
        #: at start from the cluster's size unless given)
        self.burst: int | None = None
        self.queue: ChunkQueue | None = None
        self._counted: list[WorkerCapacity] | None = None  # what slots counts
        self._out: dict[Future[Any], _Out] = {}  # by stand-in, once submitted
        self._stops: set[asyncio.Task[None]] = set()
        self._ids = itertools.count()

    def start(self, sink: CompletionSink) -> None:
        """Make the queue once the worker list is known (its slots are the
        workers' threads)."""
        if not self.enabled:
            return
        slots = self._slots()
        self.queue = ChunkQueue(
            self._send, lost, slots, sink, self._functions.blob, "Dask cluster"
        )
        if self.burst is None:
            self.burst = max(MIN_BURST, 2 * slots)
        self._state.lost_hooks.append(self._jobs_lost)

    def _slots(self) -> int:
        """Threads of the known workers, or of an allocation's planned ones
        before they connect; one for a cluster with none yet."""
        state = self._state
        workers = self._counted = state.workers or state.planned
        return max(1, sum(w.nthreads for w in workers))

    # -- routing -------------------------------------------------------------------
    def route(self, specs: Sequence[TaskSpec]) -> tuple[list[TaskSpec], list[str]]:
        """Queue the specs that go in chunks; the rest for Dask, and the uids of
        piped specs whose upstreams are split between the two."""
        queue, burst = self.queue, self.burst
        if queue is None or burst is None:
            return list(specs), []
        if (self._state.workers or self._state.planned) is not self._counted:
            queue.slots = self._slots()  # the worker list was refreshed
        return route(queue, specs, burst, _eligible)

    # -- Dask's side ---------------------------------------------------------------
    def _send(self, calls: list[Call]) -> Future[Any]:
        stand_in: Future[Any] = Future()
        loop = self._state.life.loop
        assert loop is not None
        # A closed loop raises RuntimeError: the queue fails the chunk's tasks.
        loop.call_soon_threadsafe(self._launch, calls, stand_in)
        return stand_in

    def _launch(self, calls: list[Call], stand_in: Future[Any]) -> None:
        state = self._state
        client = state.client
        if stand_in.done():
            return  # every task of it was cancelled meanwhile
        if state.dead is not None:  # no worker will ever come: say why now
            stand_in.set_exception(JobLost(state.dead))
            return
        if client is None or state.life.closed:
            stand_in.cancel()  # the queue fails its tasks: the cluster shut down
            return
        if client.status != "running":  # its futures would wait for ever
            stand_in.set_exception(_Dropped(_NOT_CONNECTED.format(client.status)))
            return
        if _size(calls) > SCATTER_BYTES:  # a graph that big makes Dask warn
            state.life.spawn(self._scatter_and_submit(calls, stand_in))
            return
        self._submit(calls, stand_in)

    async def _scatter_and_submit(
        self, calls: list[Call], stand_in: Future[Any]
    ) -> None:
        """Send big calls straight to a worker first: a piped task's argument
        is the value of its upstream, which may be any size."""
        client = self._state.client
        assert client is not None
        try:
            [held] = await client.scatter([calls], hash=False)
        except Exception as exc:
            _settle(stand_in, None, exc)
            return
        if not stand_in.done():
            self._submit(held, stand_in)

    def _submit(self, calls: list[Call] | DaskFuture, stand_in: Future[Any]) -> None:
        state = self._state
        client = state.client
        assert client is not None
        key = f"asyncflow-chunk-{state.token}-{next(self._ids)}"
        state.keys.add(key)  # so that its pushed outcome is kept
        try:
            fut = client.submit(
                run_chunk_task, state.topic, key, calls, key=key, pure=False
            )
        except Exception as exc:
            state.keys.discard(key)
            stand_in.set_exception(exc)
            return
        watcher = state.life.spawn(self._watch(key, fut, stand_in))
        self._out[stand_in] = (key, fut, watcher)
        stand_in.add_done_callback(self._settled)

    async def _watch(self, key: str, fut: DaskFuture, stand_in: Future[Any]) -> None:
        """Resolve ``stand_in`` from ``fut``: its pushed outcome, else one
        gathered with the other fetches of the loop turn."""
        try:
            exc = await fut.exception()
            if isinstance(exc, KilledWorker) and self._why_lost is not None:
                why = await self._why_lost()  # the batch job that took its worker
                if why is not None:
                    exc = JobLost(why)
            if stand_in.done():
                return
            if exc is None and fut.status == "finished":
                blob = self._state.pushed.pop(key, None)
                if blob is not None:
                    outcome = pickle.loads(blob)
                else:
                    outcome = await self._completions.fetch(fut)
                _settle(stand_in, outcome, None)
            else:
                _settle(stand_in, None, exc or _dropped(fut))
        except Exception as exc:
            _settle(stand_in, None, exc)

    def _settled(self, stand_in: Future[Any]) -> None:
        out = self._out.pop(stand_in, None)
        if out is None:
            return
        key, fut, watcher = out
        self._state.keys.discard(key)
        self._state.pushed.pop(key, None)
        if stand_in.cancelled():  # every task of the chunk was cancelled
            watcher.cancel()
            self._stop([fut])

    def _stop(self, futures: list[DaskFuture]) -> None:
        task = self._state.life.spawn(self._cancel_in_dask(futures))
        self._stops.add(task)
        task.add_done_callback(self._stops.discard)

    async def _cancel_in_dask(self, futures: list[DaskFuture]) -> None:
        client = self._state.client
        if client is None or client.status != "running":
            return
        try:
            await client.cancel(futures, force=True)
        except Exception:  # finished meanwhile, or the client is closing
            log.debug(
                "dask: cancelling %d chunk(s) failed", len(futures), exc_info=True
            )

    def _jobs_lost(self, message: str) -> None:
        """An allocation's job ended: fail every chunk out, as ``allocation``
        fails every task (Dask would keep those it queued for ever)."""
        out, self._out = self._out, {}
        for stand_in, (key, _, watcher) in out.items():
            self._state.keys.discard(key)
            watcher.cancel()
            _settle(stand_in, None, JobLost(message))
        if out:
            self._stop([fut for _, fut, _ in out.values()])

    # -- cancel and close ------------------------------------------------------------
    def cancel(self, uids: Sequence[str]) -> list[str]:
        """Cancel the chunked ones among ``uids``; return the others."""
        return list(uids) if self.queue is None else self.queue.cancel_many(uids)

    async def close(self) -> None:
        """Stop sending, fail the tasks of the chunks still out and cancel
        those in Dask, while the client is still up."""
        queue, self.queue = self.queue, None
        if queue is None:
            return
        with contextlib.suppress(ValueError):
            self._state.lost_hooks.remove(self._jobs_lost)
        out, self._out = self._out, {}
        for stand_in in queue.close():
            stand_in.cancel()  # the queue fails its tasks: the cluster shut down
        for key, _, watcher in out.values():
            self._state.keys.discard(key)
            watcher.cancel()
        if out:
            self._stop([fut for _, fut, _ in out.values()])
        if self._stops:
            await asyncio.wait(list(self._stops), timeout=CLOSE_TIMEOUT)


def _eligible(spec: TaskSpec) -> bool:
    """A plain call without Dask's placement options, whose arguments are small
    enough to ride in a graph, reading no value the cluster holds (a chunk's
    arguments travel through the driver)."""
    options = spec.options
    args = (spec.args, spec.kwargs)
    return (
        spec.function is not None
        and spec.chunk
        and spec.resources.is_default
        and not (options and any(k in options for k in SUBMIT_OPTIONS))
        and payload(spec.args, spec.kwargs) <= SCATTER_EACH
        and not (spec.has_remote_args and contains(args, _VALUES))
    )


def _size(calls: list[Call]) -> int:
    """Bytes the calls take in a graph (a function shared by several calls is
    pickled once with them)."""
    blobs = {id(c[0]): len(c[0]) for c in calls}
    return sum(blobs.values()) + sum(len(c[1]) for c in calls)


def _settle(stand_in: Future[Any], outcome: Any, exc: BaseException | None) -> None:
    if stand_in.done():
        return
    if exc is not None:
        stand_in.set_exception(exc)
    else:
        stand_in.set_result(outcome)


_NOT_CONNECTED = (
    "the Dask client is not connected to its scheduler (status {!r}); was the "
    "scheduler restarted or the connection to it lost?"
)


class _Dropped(Exception):
    """Dask let go of a chunk without running it to the end."""


def _dropped(fut: DaskFuture) -> _Dropped:
    reason = getattr(getattr(fut, "_state", None), "exception", None)
    return _Dropped(
        f"Dask dropped its chunk ({reason or fut.status}); was the scheduler "
        "restarted or the connection to it lost?"
    )


def lost(exc: BaseException) -> str | None:
    """Why the tasks of a chunk that ``exc`` failed were lost with it."""
    if isinstance(exc, JobLost):
        # the toolkit's words and hint, without the task the queue names first
        return str(lost_error("", str(exc))).removeprefix("task '': ")
    if isinstance(exc, KilledWorker):
        return (
            f"the Dask worker running its chunk died ({exc}); use retries= to "
            "re-run such tasks"
        )
    if isinstance(exc, WorkerLostError | _Dropped):
        return str(exc)
    return None
