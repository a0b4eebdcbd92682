"""Tasks on a thread pool, without a ``Future`` per task.

``executor.submit`` costs a ``Future``, a work item, a lock and a semaphore per
call, which is most of what a no-op task costs.  So tasks for a thread pool
(functions and commands) wait in a deque instead, and at most ``max_workers``
runner jobs on the executor pop from it until it is empty.  Parallelism is the
same (a free worker takes the next task), and the executor stays the user's: its
threads, its limits, its shutdown.

Piped tasks (``Capability.PIPELINE``) wait in ``_pipes`` for upstream tasks of
the same pool.  The runner that finishes an upstream runs its ready dependent
next, in the same thread, so a chain of tasks never crosses to the event loop
between hops.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Executor
from typing import Any

from ..errors import EngineClosedError
from ..protocol import CompletionSink
from ..spec import TaskSpec
from ..worker import run_spec
from ._pipes import Pipes

__all__ = ["ThreadQueue"]


class ThreadQueue:
    """The queue, its runner jobs and the piped specs of one thread pool."""

    def __init__(self, executor: Executor, workers: int, sink: CompletionSink):
        self._executor = executor
        self._workers = workers
        self._sink = sink
        self._queue: deque[TaskSpec] = deque()
        self._queued: set[str] = set()  # in the deque and still wanted
        self._pipes = Pipes(sink)
        self._live = self._pipes.live  # here and unfinished: queued, running, piped
        self._runners = 0
        self._lock = threading.Lock()
        #: where commands write their output (the pool's temp dir)
        self.spill_dir: str | None = None

    # -- the loop's side -----------------------------------------------------------
    def put(self, specs: Sequence[TaskSpec]) -> list[str]:
        """Take ``specs``; the uids of piped ones whose upstream is gone."""
        queued = False
        refused = []
        for spec in specs:
            if spec.has_remote_args:
                if not self._pipes.park(spec):
                    refused.append(spec.uid)
                continue
            self._live.add(spec.uid)
            self._queued.add(spec.uid)
            self._queue.append(spec)
            queued = True
        if queued:
            self._start_runners()
        return refused

    def cancel(self, uid: str) -> bool:
        """Drop a task that has not started; whether it was here to drop."""
        if uid in self._queued:
            self._queued.discard(uid)  # a runner that got there first runs it
            self._live.discard(uid)
            return True
        return self._pipes.drop(uid)

    def close(self) -> list[str]:
        """Drop what waits; return the uids still running (a command among
        them is the caller's to kill)."""
        self._queued.clear()
        live = list(self._live)
        self._pipes.clear()
        return live

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
            value = run_spec(spec, self.spill_dir)
        except BaseException as exc:
            self._finished(uid, False, None)
            sink.set_exception(uid, exc)
            return None
        sink.set_result(uid, value)
        return self._finished(uid, True, value)

    def _finished(self, uid: str, ok: bool, value: Any) -> TaskSpec | None:
        ready = self._pipes.finished(uid, ok, value)
        if not ready:
            return None
        for spec in ready[1:]:
            self._queued.add(spec.uid)
            self._queue.append(spec)
        if len(ready) > 1:
            self._start_runners()
        return ready[0]
