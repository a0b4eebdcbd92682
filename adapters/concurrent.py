"""The embedded default: any :class:`concurrent.futures.Executor`.

Threads run functions in the driver process, so nothing is serialised.  A process
pool gets each function cloudpickled once (closures and lambdas work) and cached
by the function object.  Executables never occupy a process-pool worker: they are
subprocesses anyway, so they run from a thread in the driver, where cancelling
can kill their process group.

Function tasks on a thread pool go through a queue drained by at most
``max_workers`` runner jobs, not one ``executor.submit`` each, and piped chains
run hop after hop in one thread (see ``_threadqueue``).

Ownership: the backend shuts down the executor it was given (the page's
``ConcurrentExecutionBackend(ThreadPoolExecutor())`` leaves no thread behind).
Pass ``shutdown_executor=False`` to keep a shared executor alive.
"""

from __future__ import annotations

import os
import pickle
import sys
import threading
from collections.abc import Sequence
from concurrent.futures import (
    CancelledError,
    Executor,
    Future,
    ProcessPoolExecutor,
    ThreadPoolExecutor,
)
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from .._util import run_in_thread
from ..errors import (
    EngineClosedError,
    ResourceUnavailableError,
    SerializationError,
    WorkerLostError,
)
from ..protocol import BackendInfo, Capabilities, Capability, CompletionSink
from ..spec import TaskSpec
from ..worker import (
    call_function,
    call_pickled,
    dumps_function,
    kill_command,
    run_command,
)
from ._threadqueue import ThreadQueue

__all__ = ["ConcurrentExecutionBackend", "process_backend"]

C = Capability

_COMMON = (
    C.FUNCTIONS,
    C.EXECUTABLES,
    C.KILL_EXECUTABLES,
    C.RESOURCES,
    C.LARGE_PAYLOADS,
    C.PARALLEL,
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
    cancel_running=_NO_INTERRUPT,
    gpus="concurrent.futures knows nothing of GPUs",
    serializes="threads share the driver's memory",
)
PROCESS_CAPABILITIES = Capabilities.of(
    *_COMMON,
    C.SERIALIZES,
    cancel_running=_NO_INTERRUPT,
    gpus="concurrent.futures knows nothing of GPUs",
    pipeline=_NO_PIPELINE,
)


class ConcurrentExecutionBackend:
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
        self._executor: Executor = executor or ThreadPoolExecutor(
            max_workers=max_workers or min(32, (os.cpu_count() or 1) + 4),
            thread_name_prefix="asyncflow",
        )
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
        self._pickled: dict[Any, bytes] = {}
        self._drain = not self._processes and isinstance(
            self._executor, ThreadPoolExecutor
        )
        self._threads: ThreadQueue | None = None  # made at start, with the sink
        self._sink: CompletionSink | None = None
        self._closed = False
        self._lock = threading.Lock()
        caps = PROCESS_CAPABILITIES if self._processes else THREAD_CAPABILITIES
        if not self._processes and not self._drain:
            caps = Capabilities(
                caps.supported - {C.PIPELINE},
                {**caps.reasons, C.PIPELINE: _NO_PIPELINE},
            )
        if self._workers < 2:
            caps = Capabilities(
                caps.supported - {C.PARALLEL},
                {**caps.reasons, C.PARALLEL: "the executor has a single worker"},
            )
        kind = "processes" if self._processes else "threads"
        self._info = BackendInfo(
            name=f"concurrent-{kind}",
            runtime=f"concurrent.futures.{type(self._executor).__name__}",
            runtime_version=sys.version.split()[0],
            capabilities=caps,
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

    def submit(self, specs: Sequence[TaskSpec]) -> None:
        sink = self._sink
        assert sink is not None
        futures = self._futures
        submit = self._executor.submit
        threads = self._threads
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
            if threads is not None and spec.command is None:
                queued.append(spec)
                continue
            try:
                if spec.command is not None:
                    f = self._commands.submit(self._run_here, spec)
                elif self._processes:
                    f = submit(
                        call_pickled,
                        self._pickle(spec),
                        spec.args,
                        spec.kwargs,
                        spec.is_async,
                        spec.name,
                    )
                    f.uid = spec.uid  # type: ignore[attr-defined]
                    f.task_name = spec.name  # type: ignore[attr-defined]
                    f.add_done_callback(self._done)
                else:
                    f = submit(self._run_here, spec)
            except SerializationError as exc:
                sink.set_exception(spec.uid, exc)
                continue
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
            assert threads is not None
            threads.put(queued)

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
            if spec.command is not None:
                value = run_command(spec.command, uid, spec.name)
            else:
                value = call_function(
                    spec.function,  # type: ignore[arg-type]
                    spec.args,
                    spec.kwargs,
                    spec.is_async,
                    spec.name,
                )
        except BaseException as exc:
            self._futures.pop(uid, None)
            sink.set_exception(uid, exc)
            return
        self._futures.pop(uid, None)
        sink.set_result(uid, value)

    def _pickle(self, spec: TaskSpec) -> bytes:
        fn = spec.function
        try:
            return self._pickled[fn]
        except KeyError:
            pass
        except TypeError:  # unhashable callable object
            return self._dumps(spec)
        blob = self._pickled[fn] = self._dumps(spec)
        return blob

    @staticmethod
    def _dumps(spec: TaskSpec) -> bytes:
        try:
            return dumps_function(spec.function)  # type: ignore[arg-type]
        except Exception as exc:
            raise SerializationError(
                f"task {spec.name!r}: its function cannot be serialised for a "
                f"process pool ({type(exc).__name__}: {exc}); define it at module "
                "level and do not capture locks, sockets or open files"
            ) from exc

    def _done(self, f: Future[Any]) -> None:
        uid: str = f.uid  # type: ignore[attr-defined]
        self._futures.pop(uid, None)
        sink = self._sink
        assert sink is not None
        try:
            exc = f.exception()
        except CancelledError:
            return
        if exc is None:
            sink.set_result(uid, f.result())
            return
        name = f.task_name  # type: ignore[attr-defined]
        if isinstance(exc, BrokenProcessPool):
            self._replace_broken_pool()
            exc = WorkerLostError(
                f"task {name!r}: a worker of its process pool died while the task "
                f"ran or waited in that pool ({exc}); a dead worker breaks the whole "
                "pool, which was replaced: use retries= to re-run such tasks"
            )
        elif isinstance(exc, pickle.PicklingError | TypeError | AttributeError) and (
            self._processes and "pickle" in str(exc).lower()
        ):
            exc = SerializationError(
                f"task {name!r}: an argument or result cannot be pickled ({exc}); "
                "pass plain data or define the types at module level"
            )
        sink.set_exception(uid, exc)

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
        threads = self._threads
        for uid in uids:
            if threads is not None and threads.cancel(uid):
                continue
            f = self._futures.pop(uid, None)
            if f is not None and not _cancel(f) and not kill_command(uid):
                self._abandon(f)

    def _abandon(self, f: Future[Any]) -> None:
        if self._processes and not f.done():
            self._abandoned.add(f)
            f.add_done_callback(self._abandoned.discard)

    async def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._threads is not None:
            self._threads.close()
        for uid, f in list(self._futures.items()):
            if not _cancel(f) and not kill_command(uid):
                self._abandon(f)
        abandoned = any(not f.done() for f in list(self._abandoned))
        executors = [self._commands] if self._commands is not self._executor else []
        if self._owns:
            executors.append(self._executor)
        for ex in executors:
            if abandoned and isinstance(ex, ProcessPoolExecutor):
                # Work the engine abandoned would hold shutdown hostage: stop it.
                # SIGKILL, as a task may ignore SIGTERM; the whole pool goes.
                for proc in list((getattr(ex, "_processes", None) or {}).values()):
                    proc.kill()
            await run_in_thread(_shutdown_executor, ex, name="asyncflow-shutdown")
        self._pickled.clear()


def _cancel(f: Future[Any]) -> bool:
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


def process_backend(max_workers: int | None = None) -> ConcurrentExecutionBackend:
    """A ConcurrentExecutionBackend over a fresh ProcessPoolExecutor."""
    return ConcurrentExecutionBackend(
        ProcessPoolExecutor(max_workers or os.cpu_count())
    )


process_backend.CAPABILITIES = PROCESS_CAPABILITIES  # type: ignore[attr-defined]
