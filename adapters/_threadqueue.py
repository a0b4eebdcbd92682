"""Function tasks on a thread pool, without a ``Future`` per task.

``executor.submit`` costs a ``Future``, a work item, a lock and a semaphore per
call, which is most of what a no-op task costs.  So function tasks for a thread
pool wait in a deque instead, and at most ``max_workers`` runner jobs on the
executor pop from it until it is empty.  Parallelism is the same (a free worker
takes the next task), and the executor stays the user's: its threads, its
limits, its shutdown.

Piped tasks (``Capability.PIPELINE``) wait here for upstream tasks of the same
pool.  The runner that finishes an upstream runs its ready dependent next, in the
same thread, so a chain of tasks never crosses to the event loop between hops.
"""

from __future__ import annotations

import dataclasses
import threading
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Executor
from typing import Any

from ..errors import EngineClosedError, UpstreamGone
from ..protocol import CompletionSink, UpstreamRef
from ..spec import TaskSpec
from ..worker import call_function

__all__ = ["ThreadQueue"]


class _Waiting:
    """A piped spec and what it still waits for."""

    __slots__ = ("missing", "spec", "values")

    def __init__(self, spec: TaskSpec, missing: set[str]):
        self.spec = spec
        self.missing = missing
        self.values: dict[str, Any] = {}


class ThreadQueue:
    """The queue, its runner jobs and the piped specs of one thread pool."""

    def __init__(self, executor: Executor, workers: int, sink: CompletionSink):
        self._executor = executor
        self._workers = workers
        self._sink = sink
        self._queue: deque[TaskSpec] = deque()
        self._queued: set[str] = set()  # in the deque and still wanted
        self._live: set[str] = set()  # here and unfinished: queued, running, waiting
        self._waiting: dict[str, _Waiting] = {}  # piped, by uid
        self._waiters: dict[str, list[_Waiting]] = {}  # by upstream uid
        self._runners = 0
        self._lock = threading.Lock()

    # -- the loop's side -----------------------------------------------------------
    def put(self, specs: Sequence[TaskSpec]) -> None:
        queued = False
        for spec in specs:
            if spec.has_remote_args:
                self._pipe(spec)
                continue
            self._live.add(spec.uid)
            self._queued.add(spec.uid)
            self._queue.append(spec)
            queued = True
        if queued:
            self._start_runners()

    def _pipe(self, spec: TaskSpec) -> None:
        upstreams: set[str] = set()
        _collect(spec.args, upstreams)
        _collect(spec.kwargs, upstreams)
        with self._lock:
            gone = upstreams - self._live
            if not gone:
                waiting = _Waiting(spec, upstreams)
                self._waiting[spec.uid] = waiting
                self._live.add(spec.uid)
                for uid in upstreams:
                    self._waiters.setdefault(uid, []).append(waiting)
                return
        # Finished meanwhile: the engine resubmits it with the value.
        self._sink.set_exception(spec.uid, UpstreamGone(next(iter(gone))))

    def cancel(self, uid: str) -> bool:
        """Drop a task that has not started; whether it was here to drop."""
        if uid in self._queued:
            self._queued.discard(uid)  # a runner that got there first runs it
            self._live.discard(uid)
            return True
        with self._lock:
            if self._waiting.pop(uid, None) is None:
                return False
            self._live.discard(uid)
        return True

    def close(self) -> None:
        with self._lock:
            self._queued.clear()
            self._waiting.clear()
            self._waiters.clear()
            self._live.clear()

    # -- the runners' side ---------------------------------------------------------
    def _start_runners(self) -> None:
        with self._lock:
            need = min(self._workers - self._runners, len(self._queue))
            if need <= 0:
                return
            self._runners += need
        try:
            for _ in range(need):
                self._executor.submit(self._runner)
        except RuntimeError:  # executor shut down under us: fail what waits
            with self._lock:
                self._runners = 0
            while self._queue:
                spec = self._queue.popleft()
                if spec.uid in self._queued:
                    self._queued.discard(spec.uid)
                    self._sink.set_exception(
                        spec.uid,
                        EngineClosedError(
                            f"task {spec.name!r}: the executor is shut down"
                        ),
                    )

    def _runner(self) -> None:
        queue, queued = self._queue, self._queued
        spec: TaskSpec | None = None
        while True:
            if spec is None:
                try:
                    spec = queue.popleft()
                except IndexError:
                    with self._lock:
                        if queue:  # appended after the pop, before the lock
                            continue
                        self._runners -= 1
                        return
                try:
                    queued.remove(spec.uid)
                except KeyError:
                    spec = None  # cancelled while it waited
                    continue
            spec = self._run(spec)

    def _run(self, spec: TaskSpec) -> TaskSpec | None:
        """Run one task and report it; return a dependent to run next, if any."""
        uid, sink = spec.uid, self._sink
        sink.set_running(uid)
        try:
            value = call_function(
                spec.function,  # type: ignore[arg-type]
                spec.args,
                spec.kwargs,
                spec.is_async,
                spec.name,
            )
        except BaseException as exc:
            self._finished(uid, False, None)
            sink.set_exception(uid, exc)
            return None
        sink.set_result(uid, value)
        return self._finished(uid, True, value)

    def _finished(self, uid: str, ok: bool, value: Any) -> TaskSpec | None:
        with self._lock:
            self._live.discard(uid)
            if not self._waiters:
                return None
            waiters = self._waiters.pop(uid, None)
            if not waiters or not ok:
                # A failed upstream: the engine fails and cancels its dependents.
                return None
            ready = []
            for w in waiters:
                if self._waiting.get(w.spec.uid) is not w:
                    continue  # cancelled
                w.values[uid] = value
                w.missing.discard(uid)
                if not w.missing:
                    del self._waiting[w.spec.uid]
                    ready.append(_resolved(w))
        if not ready:
            return None
        for spec in ready[1:]:
            self._queued.add(spec.uid)
            self._queue.append(spec)
        if len(ready) > 1:
            self._start_runners()
        return ready[0]


def _collect(obj: Any, into: set[str]) -> None:
    t = type(obj)
    if t is UpstreamRef:
        into.add(obj.uid)
    elif t is tuple or t is list or t is set or t is frozenset:
        for v in obj:
            _collect(v, into)
    elif t is dict:
        for v in obj.values():
            _collect(v, into)


def _swap(obj: Any, values: dict[str, Any]) -> Any:
    t = type(obj)
    if t is UpstreamRef:
        return values[obj.uid]
    if t is tuple or t is list or t is set or t is frozenset:
        return t(_swap(v, values) for v in obj)
    if t is dict:
        return {k: _swap(v, values) for k, v in obj.items()}
    return obj


def _resolved(w: _Waiting) -> TaskSpec:
    spec = w.spec
    return dataclasses.replace(
        spec,
        args=_swap(spec.args, w.values),
        kwargs=_swap(spec.kwargs, w.values),
        has_remote_args=False,
    )
