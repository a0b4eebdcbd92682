"""The embedded default: any :class:`concurrent.futures.Executor`.

Threads run functions in the driver process, so nothing is serialised.  A process
pool gets each function cloudpickled once (closures and lambdas work) and cached
by the function object.  Executables never occupy a process-pool worker: they are
subprocesses anyway, so they run from a thread in the driver, where cancelling
can kill their process group.

Function tasks on a thread pool go through a queue drained by at most
``max_workers`` runner jobs, not one ``executor.submit`` each, and piped chains
run hop after hop in one thread (see ``_threadqueue``).  On a process pool they
wait in a queue too and travel in chunks sized to a few milliseconds of work,
and piped chains hop from the pool's own thread (see ``toolkit.chunks``).

Ownership: the backend shuts down the executor it was given (the page's
``ConcurrentExecutionBackend(ThreadPoolExecutor())`` leaves no thread behind).
Pass ``shutdown_executor=False`` to keep a shared executor alive.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import threading
from collections.abc import Sequence
from concurrent.futures import (
    Executor,
    Future,
    ProcessPoolExecutor,
    ThreadPoolExecutor,
)
from typing import Any

from .._util import run_in_thread
from ..commands import kill_command
from ..errors import (
    EngineClosedError,
    ResourceUnavailableError,
)
from ..protocol import BackendInfo, Capabilities, Capability, CompletionSink
from ..spec import TaskSpec
from ..worker import run_spec
from ._awaitable import AwaitableBackend
from ._pool import PoolChunks
from ._threadqueue import ThreadQueue
from .toolkit import FunctionCache, Scratch
from .toolkit.chunks import ChunkQueue, cancel_future

__all__ = ["ConcurrentExecutionBackend", "LocalExecutionBackend", "process_backend"]

C = Capability

_COMMON = (
    C.FUNCTIONS,
    C.EXECUTABLES,
    C.KILL_EXECUTABLES,
    C.RESOURCES,
    C.LARGE_PAYLOADS,
    C.PARALLEL,
    C.CANCEL_QUEUED,
)
_NO_INTERRUPT = (
    "a running thread or pool process cannot be interrupted; the engine "
    "abandons its result"
)
_NO_PIPELINE = (
    "concurrent.futures has no task dependencies: the engine submits a task when "
    "its inputs are ready"
)
THREAD_CAPABILITIES = Capabilities.of(
    *_COMMON,
    C.PIPELINE,
    C.REPORTS_RUNNING,
    cancel_running=_NO_INTERRUPT,
    gpus="concurrent.futures knows nothing of GPUs",
    serializes="threads share the driver's memory",
)
PROCESS_CAPABILITIES = Capabilities.of(
    *_COMMON,
    C.SERIALIZES,
    C.PIPELINE,
    reports_running="function tasks travel to pool processes in chunks, which "
    "report only their outcomes",
    cancel_running=_NO_INTERRUPT,
    gpus="concurrent.futures knows nothing of GPUs",
)


class ConcurrentExecutionBackend(AwaitableBackend):
    """Runs tasks on a ``concurrent.futures`` executor (a thread pool by default)."""

    #: for listings that must not start a runtime (``asyncflow backends``)
    CAPABILITIES = THREAD_CAPABILITIES

    def __init__(
        self,
        executor: Executor | None = None,
        *,
        shutdown_executor: bool = True,
        max_workers: int | None = None,
    ):
        self._owns = executor is None or shutdown_executor
        self._executor: Executor = executor or _default_pool(max_workers)
        self._processes = isinstance(self._executor, ProcessPoolExecutor)
        self._workers: int = getattr(self._executor, "_max_workers", 1)
        # Executables run from threads; a thread pool the user gave serves both.
        self._commands: Executor = (
            ThreadPoolExecutor(self._workers, thread_name_prefix="asyncflow-cmd")
            if self._processes
            else self._executor
        )
        self._futures: dict[str, Future[Any]] = {}
        # Running pool work the engine cancelled: the pool still runs it, and
        # shutdown must stop it instead of waiting for it.
        self._abandoned: set[Future[Any]] = set()
        self._functions = FunctionCache("a process pool")
        # Where commands' output goes (asyncflow.output): made by the first one.
        self._scratch = Scratch()
        self._drain = not self._processes and isinstance(
            self._executor, ThreadPoolExecutor
        )
        self._threads: ThreadQueue | None = None  # made at start, with the sink
        self._procs: ChunkQueue | None = None  # likewise
        self._sink: CompletionSink | None = None
        self._closed = False
        self._lock = threading.Lock()
        kind = "processes" if self._processes else "threads"
        self._info = BackendInfo(
            name=f"concurrent-{kind}",
            runtime=f"concurrent.futures.{type(self._executor).__name__}",
            runtime_version=sys.version.split()[0],
            capabilities=_capabilities(self._processes, self._drain, self._workers),
        )

    @property
    def info(self) -> BackendInfo:
        return self._info

    async def start(self, sink: CompletionSink) -> None:
        if self._closed:
            raise EngineClosedError("this ConcurrentExecutionBackend was shut down")
        self._sink = sink
        if self._drain:
            self._threads = ThreadQueue(self._executor, self._workers, sink)
        elif self._processes:
            pool = PoolChunks(lambda: self._executor, self._replace_broken_pool)
            self._procs = ChunkQueue(
                pool.send,
                pool.lost,
                self._workers,
                sink,
                self._functions.blob,
                "process pool",
            )

    def submit(self, specs: Sequence[TaskSpec]) -> list[str]:
        sink = self._sink
        assert sink is not None
        futures = self._futures
        submit = self._executor.submit
        pool = self._threads or self._procs
        queued: list[TaskSpec] = []
        for spec in specs:
            res = spec.resources
            if not res.is_default and (
                res.gpus or res.cores > self._workers or res.ranks > 1
            ):
                sink.set_exception(
                    spec.uid,
                    ResourceUnavailableError(
                        f"task {spec.name!r} asks for {res}, but this "
                        f"{self._info.runtime} has {self._workers} worker(s) and no "
                        "GPUs or MPI; lower the request or route the task to a bigger "
                        "backend"
                    ),
                )
                continue
            if spec.command is not None and self._scratch.path is None:
                self._make_scratch()
            # Commands too on a thread pool; a process pool's run on _commands.
            if pool is not None and (spec.command is None or pool is self._threads):
                queued.append(spec)
                continue
            try:
                if spec.command is not None:
                    f = self._commands.submit(self._run_here, spec)
                else:
                    f = submit(self._run_here, spec)
            except RuntimeError as exc:  # executor already shut down
                sink.set_exception(
                    spec.uid,
                    EngineClosedError(
                        f"task {spec.name!r}: the executor is shut down ({exc})"
                    ),
                )
                continue
            futures[spec.uid] = f
        if queued:
            assert pool is not None
            return pool.put(queued)
        return []

    def _make_scratch(self) -> None:
        path = self._scratch.make("asyncflow-pool-")
        if self._threads is not None:
            self._threads.spill_dir = path

    def _run_here(self, spec: TaskSpec) -> None:
        """Worker-thread entry: run and report straight to the sink.

        Reporting from here instead of a done-callback saves a lock round and an
        attribute dance per task; the thread path is the hot one.
        """
        uid = spec.uid
        sink = self._sink
        assert sink is not None
        sink.set_running(uid)
        try:
            value = run_spec(spec, self._scratch.path)
        except BaseException as exc:
            self._futures.pop(uid, None)
            sink.set_exception(uid, exc)
            return
        self._futures.pop(uid, None)
        sink.set_result(uid, value)

    def _replace_broken_pool(self) -> None:
        """A dead worker breaks a ProcessPoolExecutor for good; the rest of the
        workflow needs a fresh one."""
        with self._lock:
            old = self._executor
            if not (self._owns and getattr(old, "_broken", False)) or self._closed:
                return
            self._executor = _like(old, self._workers)
        old.shutdown(wait=False, cancel_futures=True)

    def cancel(self, uids: Sequence[str]) -> None:
        threads, procs = self._threads, self._procs
        for uid in uids:
            if threads is not None and (threads.cancel(uid) or kill_command(uid)):
                continue
            f = self._futures.pop(uid, None)
            if f is not None:
                if not cancel_future(f) and not kill_command(uid):
                    self._abandon(f)
            elif procs is not None and (stuck := procs.cancel(uid)) is not None:
                self._abandon(stuck)

    def _abandon(self, f: Future[Any]) -> None:
        if self._processes and not f.done():
            self._abandoned.add(f)
            f.add_done_callback(self._abandoned.discard)

    async def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop_outstanding()
        abandoned = any(not f.done() for f in list(self._abandoned))
        # The pool first: a pool worker forked during a command's Popen (by code
        # we do not guard) holds that command's pipes until the worker exits.
        executors = [self._executor] if self._owns else []
        if self._commands is not self._executor:
            executors.append(self._commands)
        for ex in executors:
            if abandoned and isinstance(ex, ProcessPoolExecutor):
                # Work the engine abandoned would hold shutdown hostage: stop it.
                _kill_pool_processes(ex)
            await run_in_thread(_shutdown_executor, ex, name="asyncflow-shutdown")
        self._functions.clear()
        self._scratch.close()

    def _stop_outstanding(self) -> None:
        """Cancel what has not started and kill the commands that have; pool
        work that neither reaches is abandoned, so shutdown knows to stop it."""
        if self._threads is not None:
            for uid in self._threads.close():
                kill_command(uid)
        if self._procs is not None:
            for f in self._procs.close():
                if not cancel_future(f):
                    self._abandon(f)
        for uid, f in list(self._futures.items()):
            if not cancel_future(f) and not kill_command(uid):
                self._abandon(f)


def _default_pool(max_workers: int | None) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(
        max_workers=max_workers or min(32, (os.cpu_count() or 1) + 4),
        thread_name_prefix="asyncflow",
    )


def _capabilities(processes: bool, drain: bool, workers: int) -> Capabilities:
    """What the executor can do: pipelines need one of the two queues (a foreign
    executor gets neither), and parallelism needs a second worker."""
    caps = PROCESS_CAPABILITIES if processes else THREAD_CAPABILITIES
    if not processes and not drain:
        caps = Capabilities(
            caps.supported - {C.PIPELINE},
            {**caps.reasons, C.PIPELINE: _NO_PIPELINE},
        )
    if workers < 2:
        caps = Capabilities(
            caps.supported - {C.PARALLEL},
            {**caps.reasons, C.PARALLEL: "the executor has a single worker"},
        )
    return caps


def _kill_pool_processes(ex: ProcessPoolExecutor) -> None:
    """SIGKILL, as a task may ignore SIGTERM; the whole pool goes."""
    for proc in list((getattr(ex, "_processes", None) or {}).values()):
        proc.kill()


def _like(old: Executor, workers: int) -> ProcessPoolExecutor:
    """A fresh pool configured as ``old`` was (start method, initializer and
    worker recycling carry over)."""
    opts: dict[str, Any] = {
        "mp_context": getattr(old, "_mp_context", None),
        "initializer": getattr(old, "_initializer", None),
        "initargs": getattr(old, "_initargs", ()),
    }
    recycle = getattr(old, "_max_tasks_per_child", None)
    if recycle is not None:
        opts["max_tasks_per_child"] = recycle
    return ProcessPoolExecutor(workers, **opts)


def _shutdown_executor(ex: Executor) -> None:
    ex.shutdown(wait=True, cancel_futures=True)


class LocalExecutionBackend(ConcurrentExecutionBackend):
    """radical.asyncflow's name for the embedded backend, with its signature:
    ``name`` labels it in a list of backends (``backend=[...]``)."""

    def __init__(self, executor: Executor | None = None, name: str = "default"):
        super().__init__(executor)
        self._info = dataclasses.replace(self._info, name=name)


def process_backend(max_workers: int | None = None) -> ConcurrentExecutionBackend:
    """A ConcurrentExecutionBackend over a fresh ProcessPoolExecutor."""
    return ConcurrentExecutionBackend(
        ProcessPoolExecutor(max_workers or os.cpu_count())
    )


process_backend.CAPABILITIES = PROCESS_CAPABILITIES  # type: ignore[attr-defined]
