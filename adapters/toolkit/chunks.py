"""Short function tasks sent in chunks: queued here, several per runtime call.

Every runtime charges per call (a ``ProcessPoolExecutor.submit`` costs a
``Future``, a work item and a trip through the pool's threads; a Dask, Ray or
Parsl task costs a scheduler round trip), and for a task of a millisecond that
overhead is most of the work.  So tasks wait in a deque here, and at most two
chunks per worker slot are out at once.  A chunk is one call of
:func:`~asyncflow.worker.run_chunk` carrying several tasks when they are short:
its size aims at a few milliseconds of work, from the run times the workers
report, so a task of a second or more always travels alone and a no-op fan-out
in chunks of up to ``MAX_CHUNK``.  A chunk never takes more than its share of
the queue, so the tail of a run stays balanced across workers: no worker holds
a chunk of queued work while another sits idle.

Arguments are pickled when a task is queued (an unpicklable one fails that task
at once) and every outcome on its own in the worker, so one bad value fails its
own task and never its chunk-mates.

Piped tasks (``Capability.PIPELINE``) wait in ``pipes``; the thread that
reports an upstream queues the ready dependent first in line and sends it, so a
chain's hop never waits for the event loop, and a chain of short tasks runs on
inside one worker (see ``_fuse``).

The queue knows nothing of the runtime: the adapter gives it ``send``, which
starts one ``run_chunk(calls)`` and returns a :class:`concurrent.futures.Future`
of its outcome, and ``lost``, which says whether an exception from that future
means the worker died (and so every task of the chunk is lost with it).
"""

from __future__ import annotations

import functools
import pickle
import sys
import threading
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

from ...errors import EngineClosedError, SerializationError, WorkerLostError
from ...protocol import CompletionSink
from ...spec import TaskSpec
from ...worker import Call, ChunkRef, Outcome, Span, dumps_function, raise_error
from .._pipes import Pipes

__all__ = ["MAX_CHUNK", "ChunkQueue", "cancel_future"]


#: starts ``run_chunk(calls)`` somewhere; a Future of its outcome
Send = Callable[[list[Call]], "Future[Any]"]
#: why an exception from a chunk's future means its worker died, or None
Lost = Callable[[BaseException], "str | None"]

_CHUNK_SECONDS = 0.005  # the work one chunk aims at
#: pickled bytes from which an outcome is large: a function that returned one
#: keeps the runtime's own path from then on (see ``returns_large``)
LARGE_OUTCOME = 64 * 1024
MAX_CHUNK = 64
_SMOOTHING = 0.3  # weight of a slower newest run in the per-task time estimate
_RAISE = dumps_function(raise_error)


class _Chunk:
    __slots__ = ("calls", "cancelled", "future", "uids")

    def __init__(self) -> None:
        self.uids: list[str] = []
        self.calls: list[Call] = []  # what travels: (blob, payload, ..., name, ...)
        self.cancelled = 0
        self.future: Future[Any] | None = None

    def add(self, uid: str, call: Call) -> None:
        self.uids.append(uid)
        self.calls.append(call)


class ChunkQueue:
    """The queue, the chunks in flight and the piped specs of one backend.

    ``send`` and ``lost`` are the runtime's (see the module's doc); ``slots``
    is how many tasks it runs at once; ``pickle_function`` returns a task's
    function, pickled (and cached); ``runtime`` names it in errors.
    """

    def __init__(
        self,
        send: Send,
        lost: Lost,
        slots: int,
        sink: CompletionSink,
        pickle_function: Callable[[TaskSpec], bytes],
        runtime: str,
    ):
        self._send = send
        self._lost = lost
        self.slots = slots
        self._sink = sink
        self._runtime = runtime
        #: the sink's optional report of when and where each task ran
        self._ran = getattr(sink, "set_ran", None)
        self._pickle_function = pickle_function
        self._queue: deque[tuple[str, Call]] = deque()
        self._queued: set[str] = set()  # in the deque and still wanted
        self.pipes = Pipes(sink)
        self._live = self.pipes.live  # queued, out in a chunk or piped
        self._where: dict[str, _Chunk] = {}  # out in a chunk
        self._chunks: set[_Chunk] = set()
        self._times: dict[bytes, float] = {}  # seconds per call, by function
        self._alone: set[str] = set()  # queued with chunk=False
        #: functions (pickled) that returned a large outcome
        self.large: set[bytes] = set()
        self._lock = threading.Lock()
        self._closed = False

    # -- the loop's side -----------------------------------------------------------
    def put(self, specs: Sequence[TaskSpec]) -> list[str]:
        """Take ``specs``; the uids of piped ones whose upstream is gone."""
        refused = []
        for spec in specs:
            if not spec.has_remote_args:
                self._enqueue(spec, last=True)
            elif not self.pipes.park(spec):
                refused.append(spec.uid)
        self._pump()
        return refused

    def cancel_many(self, uids: Sequence[str]) -> list[str]:
        """Cancel the tasks of ``uids`` that are here (a running chunk-mate's
        result is dropped); return the others."""
        live = self._live
        others = []
        for uid in uids:
            if uid in live:
                self.cancel(uid)
            else:
                others.append(uid)
        return others

    def cancel(self, uid: str) -> Future[Any] | None:
        """Drop a task that is not in the pool yet.  For one that is, return its
        chunk's pool future when the pool will run it anyway (to abandon)."""
        if uid in self._queued:
            self._queued.discard(uid)  # a chunk being formed may still take it
            self._live.discard(uid)
            return None
        if self.pipes.drop(uid):
            return None
        chunk = self._where.get(uid)
        if chunk is None or chunk.future is None:
            return None
        chunk.cancelled += 1
        if chunk.cancelled == len(chunk.uids) and cancel_future(chunk.future):
            return None
        return chunk.future

    def close(self) -> list[Future[Any]]:
        """Stop sending; return the pool futures still out."""
        with self._lock:
            self._closed = True
            self._queue.clear()
            self._queued.clear()
        self.pipes.clear()
        return [c.future for c in list(self._chunks) if c.future is not None]

    def returns_large(self, spec: TaskSpec) -> bool:
        """Whether ``spec``'s function has returned a large value here.  Its
        calls then keep the runtime's own path, where a runtime that keeps
        values on its workers (Dask, Ray) passes them to the next task there,
        instead of through the driver in a chunk's outcome."""
        try:
            return self._pickle_function(spec) in self.large
        except SerializationError:
            return False

    # -- either side ---------------------------------------------------------------
    def _enqueue(self, spec: TaskSpec, last: bool) -> None:
        try:
            blob = self._pickle_function(spec)
            payload = self._dumps((spec.args, spec.kwargs), spec.name)
        except SerializationError as exc:
            self._sink.set_exception(spec.uid, exc)
            return
        item = (spec.uid, (blob, payload, spec.is_async, spec.name, False))
        self._live.add(spec.uid)
        if not spec.chunk:
            self._alone.add(spec.uid)
        with self._lock:  # _take peeks before it pops
            self._queued.add(spec.uid)
            if last:
                self._queue.append(item)
            else:
                self._queue.appendleft(item)  # a ready dependent: depth first

    def _pump(self) -> None:
        """Send chunks while the pool has room for them."""
        while True:
            with self._lock:
                if self._closed or len(self._chunks) >= 2 * self.slots:
                    return
                chunk = self._take()
                if chunk is None:
                    return
                self._chunks.add(chunk)
                for uid in chunk.uids:
                    self._where[uid] = chunk
            try:
                chunk.future = f = self._send(chunk.calls)
            except RuntimeError as exc:  # shut down under us
                with self._lock:
                    self._chunks.discard(chunk)
                self._fail(
                    chunk,
                    EngineClosedError,
                    f"the {self._runtime} is shut down ({exc})",
                )
                return
            f.add_done_callback(functools.partial(self._chunk_done, chunk))

    def _take(self) -> _Chunk | None:
        """The next chunk: the head of the queue, then more tasks while their
        measured run times fit the chunk's budget (a function never measured
        travels alone) and the chunk stays within its share of the queue."""
        queue, queued, times = self._queue, self._queued, self._times
        share = min(MAX_CHUNK, max(1, len(queue) // (2 * self.slots)))
        budget = _CHUNK_SECONDS
        chunk = _Chunk()
        calls = chunk.calls
        while queue:
            uid, call = queue[0]
            if uid not in queued:
                queue.popleft()  # cancelled while it waited
                self._alone.discard(uid)
                continue
            if uid in self._alone:  # chunk=False: a chunk of its own
                return self._alone_chunk(chunk)
            took = times.get(call[0])
            if calls and (took is None or took > budget or len(calls) >= share):
                break
            budget -= _CHUNK_SECONDS if took is None else took
            queue.popleft()
            queued.discard(uid)
            chunk.add(uid, call)
        if not calls:
            return None
        if budget > 0 and len(calls) < MAX_CHUNK:
            self._fuse(chunk, budget)
        return chunk

    def _alone_chunk(self, chunk: _Chunk) -> _Chunk:
        """``chunk`` as it is, or, if empty, with the task that must travel
        alone at the head of the queue."""
        if not chunk.calls:
            uid, call = self._queue.popleft()
            self._queued.discard(uid)
            self._alone.discard(uid)
            chunk.add(uid, call)
        return chunk

    def _fuse(self, chunk: _Chunk, budget: float) -> None:
        """Add piped dependents of the chunk's tasks to the chunk, their
        upstreams' values standing as ChunkRefs: a chain runs on in the worker,
        hop after hop, without a trip back here."""
        left = [budget, MAX_CHUNK - len(chunk.calls)]

        def fits(spec: TaskSpec) -> bool:
            if not spec.chunk:
                return False  # it travels alone, from the queue
            try:
                took = self._times.get(self._pickle_function(spec))
            except SerializationError:
                return False  # it fails on its own path
            if took is None or took > left[0] or left[1] <= 0:
                return False
            left[0] -= took
            left[1] -= 1
            return True

        base = len(chunk.calls)
        into: dict[str, Any] = {uid: ChunkRef(i) for i, uid in enumerate(chunk.uids)}
        for spec in self.pipes.fuse(into, fits, lambda i: ChunkRef(base + i)):
            blob = self._pickle_function(spec)  # cached by ``fits``
            try:
                payload = self._dumps((spec.args, spec.kwargs), spec.name)
            except SerializationError as exc:  # it fails there: it keeps its place
                blob, payload = _RAISE, pickle.dumps(((exc,), {}))
            call = (blob, payload, spec.is_async, spec.name, True)
            chunk.add(spec.uid, call)

    # -- the runtime's side -----------------------------------------------------------
    def _chunk_done(self, chunk: _Chunk, f: Future[Any]) -> None:
        with self._lock:
            self._chunks.discard(chunk)
            for uid in chunk.uids:
                self._where.pop(uid, None)
        if f.cancelled():
            if chunk.cancelled < len(chunk.uids):  # not by us: the runtime closed
                self._fail(chunk, EngineClosedError, f"the {self._runtime} shut down")
        elif (exc := f.exception()) is not None:
            why = self._lost(exc)
            self._fail(chunk, WorkerLostError, why or f"its chunk failed ({exc!r})")
        else:
            outcomes, spans, worker = f.result()
            self._learn(chunk, spans)
            self._report(chunk, outcomes, spans, worker)
        self._pump()

    def _report(
        self, chunk: _Chunk, outcomes: list[Outcome], spans: list[Span], worker: str
    ) -> None:
        sink = self._sink
        ran = self._ran
        for uid, call, (ok, data, pickled), (began, took) in zip(
            chunk.uids, chunk.calls, outcomes, spans, strict=True
        ):
            name = call[3]
            if ok is None:  # skipped: its upstream failed, and the engine fails it
                self.pipes.finished(uid, False, None)
                continue
            if ran is not None:
                ran(uid, began, began + took, worker)
            # an int or a short str costs a length or a missing attribute here
            if (
                ok
                and (
                    len(data)
                    if pickled or type(data) in _SIZED
                    else getattr(data, "nbytes", 0)
                )
                > LARGE_OUTCOME
            ):
                self.large.add(call[0])
            try:
                value = pickle.loads(data) if pickled else data
            except Exception as exc:
                ok, value = (
                    False,
                    SerializationError(
                        f"task {name!r}: its outcome cannot be unpickled in the "
                        f"driver ({type(exc).__name__}: {exc}); define its types "
                        "at module level"
                    ),
                )
            if ok:
                sink.set_result(uid, value)
            else:
                sink.set_exception(uid, value)
            for spec in self.pipes.finished(uid, ok, value):
                self._enqueue(spec, last=False)

    def _fail(self, chunk: _Chunk, kind: type[Exception], why: str) -> None:
        for uid, call in zip(chunk.uids, chunk.calls, strict=True):
            name = call[3]
            self.pipes.finished(uid, False, None)
            self._sink.set_exception(uid, kind(f"task {name!r}: {why}"))

    def _dumps(self, obj: Any, name: str) -> bytes:
        try:
            return pickle.dumps(obj, pickle.HIGHEST_PROTOCOL)
        except Exception as exc:
            raise SerializationError(
                f"task {name!r}: an argument cannot be pickled for a "
                f"{self._runtime} ({type(exc).__name__}: {exc}); pass plain data "
                "or define the types at module level"
            ) from exc

    def _learn(self, chunk: _Chunk, spans: list[Span]) -> None:
        """Per function, the run time a call is expected to take: a faster run
        counts at once, a slower one only in part.  A worker that shares its
        CPU with the runtime's own busy threads (radical.pilot's) reports
        wall times many times the work, now and then; an estimate that
        followed them would send a no-op alone for ever, while a task that
        really is long is never seen to be short."""
        times = self._times
        for call, (_, took) in zip(chunk.calls, spans, strict=True):
            if took < 0:
                continue  # skipped
            blob = call[0]
            old = times.get(blob)
            if old is None or took < old:
                times[blob] = took
            else:
                times[blob] = old + _SMOOTHING * (took - old)


#: plain outcomes measured by their length (the rest by ``nbytes``, if any)
_SIZED = frozenset({bytes, str})


def cancel_future(f: Future[Any]) -> bool:
    """``f.cancel()``, made safe for a ProcessPoolExecutor that breaks later.

    Before Python 3.12, a pool that breaks (a worker died, or shutdown killed
    abandoned work) calls ``set_exception`` on every pending future, and a future
    cancelled while still pending makes that raise ``InvalidStateError``: the
    pool's manager thread dies half-way, the futures after it never finish and its
    queue thread is never closed (CPython gh-107219).  A cancelled future takes no
    exception anyway, so it ignores the call."""
    if not f.cancel():
        return False
    if _SET_EXCEPTION_AFTER_CANCEL_RAISES:
        f.set_exception = _ignore  # type: ignore[method-assign,assignment]
    return True


_SET_EXCEPTION_AFTER_CANCEL_RAISES = sys.version_info < (3, 12)


def _ignore(exc: BaseException | None) -> None:
    pass
