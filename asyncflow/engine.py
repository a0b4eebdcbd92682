"""The workflow engine: an asyncio DAG over one or more execution backends.

The engine never polls.  A task's future carries the list of its waiting
dependents; when a backend reports a completion (through :class:`_Sink`, from any
thread, batched onto the loop), that list is walked and every dependent whose last
dependency just finished is queued.  Everything queued in one loop turn goes to
its backend in one ``submit`` call.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any, overload

from .errors import (
    AsyncflowError,
    DependencyFailureError,
    EngineClosedError,
    ResourceUnavailableError,
    SerializationError,
    TaskDefinitionError,
    TaskTimeoutError,
)
from .events import EventKind, EventStream, Subscriber, TaskEvent, TraceRecorder
from .future import TaskFuture, TaskState
from .protocol import Capability, ExecutionBackend, RemoteValue
from .spec import Command, TaskSpec
from .tasks import TaskDecl, TaskKind, TaskOptions, collect_futures, substitute

__all__ = ["WorkflowEngine"]

log = logging.getLogger("asyncflow")
log.addHandler(logging.NullHandler())

#: Called with every new engine; ``asyncflow run`` uses it to attach tracing and
#: progress to engines the user's script creates.
creation_hooks: list[Callable[[WorkflowEngine], None]] = []

_FINAL = (TaskState.DONE, TaskState.FAILED, TaskState.CANCELLED)
# Errors that will fail the same way every time: retrying them only wastes time.
_NOT_RETRIED = (
    TaskDefinitionError,
    SerializationError,
    ResourceUnavailableError,
    DependencyFailureError,
)
_set_result = asyncio.Future.set_result
_set_exception = asyncio.Future.set_exception
_future_cancel = asyncio.Future.cancel
_future_result = asyncio.Future.result


class _Sink:
    """Completions from any thread, delivered to the loop in batches."""

    __slots__ = ("_engine", "_loop", "_queue", "_scheduled", "_thread")

    def __init__(self, engine: WorkflowEngine, loop: asyncio.AbstractEventLoop):
        self._engine = engine
        self._loop = loop
        self._queue: deque[tuple[str, int, Any]] = deque()
        self._scheduled = False
        self._thread = threading.get_ident()

    def set_result(self, uid: str, value: Any) -> None:
        self._push((uid, 0, value))

    def set_exception(self, uid: str, exc: BaseException) -> None:
        self._push((uid, 1, exc))

    def set_running(self, uid: str) -> None:
        if self._engine._subscribers:  # only observers care; skip the hop otherwise
            self._push((uid, 2, None))

    def _push(self, item: tuple[str, int, Any]) -> None:
        self._queue.append(item)
        if not self._scheduled:
            self._scheduled = True
            try:
                if threading.get_ident() == self._thread:
                    self._loop.call_soon(self._drain)
                else:
                    self._loop.call_soon_threadsafe(self._drain)
            except RuntimeError:  # loop closed: nobody is waiting any more
                pass

    def _drain(self) -> None:
        # Clear the flag *before* popping: a producer that appends after this
        # point schedules another drain, one that appended before is seen below.
        self._scheduled = False
        queue = self._queue
        inflight = self._engine._inflight
        engine = self._engine
        while queue:
            uid, kind, value = queue.popleft()
            if kind == 2:
                fut = inflight.get(uid)
                if fut is not None and fut._tstate is TaskState.SUBMITTED:
                    fut._tstate = TaskState.RUNNING
                    if engine._subscribers:
                        engine._emit(EventKind.RUNNING, fut)
                continue
            fut = inflight.pop(uid, None)
            if fut is None:
                continue  # cancelled or timed out meanwhile
            if kind == 0:
                engine._finish_ok(fut, value)
            else:
                engine._finish_error(fut, value)


class WorkflowEngine:
    """Runs decorated tasks on backends, wiring futures into a DAG.

    ``backend`` is one backend, a ``{name: backend}`` dict (the first is the
    default), or ``None`` for the default: ``$ASYNCFLOW_BACKEND`` if set, else a
    thread pool.  The constructor is synchronous and may run in or out of an event
    loop: the engine binds to the loop that first uses it.

    The engine owns the backends handed to it: :meth:`shutdown` shuts each one
    down.  Each backend in turn only stops runtime resources it started itself
    (see the adapters).
    """

    def __init__(
        self, backend: ExecutionBackend | Mapping[str, ExecutionBackend] | None = None
    ):
        if backend is None:
            from .registry import default_backend

            backend = default_backend()
        if isinstance(backend, Mapping):
            if not backend:
                raise TaskDefinitionError("WorkflowEngine(backend={}) needs a backend")
            backends = dict(backend)
        else:
            backends = {"default": backend}
        for name, b in backends.items():
            if not isinstance(b, ExecutionBackend):
                raise TaskDefinitionError(
                    f"backend {name!r} ({b!r}) does not implement the asyncflow "
                    "backend protocol (info, start, submit, cancel, shutdown)"
                )
        self._backends: dict[str, ExecutionBackend] = backends
        self._default = next(iter(backends))
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sink: _Sink | None = None
        self._inflight: dict[str, TaskFuture] = {}  # spec uid -> future
        self._open: dict[str, TaskFuture] = {}  # every unfinished task
        self._queues: dict[int, list[TaskSpec]] = {}
        self._started: dict[int, ExecutionBackend] = {}
        self._starting: dict[int, asyncio.Task[None]] = {}
        self._flush_scheduled = False
        self._counter = itertools.count(1)
        self._closed = False
        self._shutdown_task: asyncio.Future[None] | None = None
        self._guard: asyncio.Task[None] | None = None
        self._subscribers: list[Subscriber] = []
        self._recorder: TraceRecorder | None = None
        self._labels = {
            id(b): (name if isinstance(backend, Mapping) else b.info.name)
            for name, b in backends.items()
        }
        for hook in creation_hooks:
            hook(self)

    # -- construction helpers ------------------------------------------------
    @classmethod
    async def create(cls, backend: Any = None) -> WorkflowEngine:
        """Build an engine and wait until its backends have started."""
        engine = cls(backend)
        await engine.start()
        return engine

    async def start(self) -> None:
        """Start every backend now instead of at the first task."""
        self._bind(asyncio.get_running_loop())
        await asyncio.gather(*self._starting.values())

    async def __aenter__(self) -> WorkflowEngine:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.shutdown()

    @property
    def backends(self) -> dict[str, ExecutionBackend]:
        return dict(self._backends)

    # -- decorators ------------------------------------------------------------
    @overload
    def function_task(self, fn: Callable[..., Any], /) -> TaskDecl: ...
    @overload
    def function_task(
        self, fn: None = None, /, **opts: Any
    ) -> Callable[[Callable[..., Any]], TaskDecl]: ...

    def function_task(self, fn: Any = None, /, **opts: Any) -> Any:
        """Run a Python function (``def`` or ``async def``) on a backend."""
        return self._decorate(fn, TaskKind.FUNCTION, opts)

    def executable_task(self, fn: Any = None, /, **opts: Any) -> Any:
        """The body returns a command (``str`` for /bin/sh, ``list[str]`` for no
        shell); it runs after its dependencies resolve and the task's value is the
        command's stdout."""
        return self._decorate(fn, TaskKind.EXECUTABLE, opts)

    def block(self, fn: Any = None, /, **opts: Any) -> Any:
        """An async function composing tasks; itself a task others can await."""
        return self._decorate(fn, TaskKind.BLOCK, opts)

    def _decorate(self, fn: Any, kind: TaskKind, opts: dict[str, Any]) -> Any:
        def make(f: Any) -> TaskDecl:
            name = getattr(f, "__name__", repr(f))
            if not callable(f):
                return TaskDecl(self, f, kind, TaskOptions())  # raises the clear error
            options = TaskOptions.build(name, **opts)
            backend: ExecutionBackend | None = None
            if kind is not TaskKind.BLOCK:
                backend = self._backend_for(options.backend, name)
                need = (
                    Capability.FUNCTIONS
                    if kind is TaskKind.FUNCTION
                    else Capability.EXECUTABLES
                )
                caps = backend.info.capabilities
                if need not in caps:
                    raise TaskDefinitionError(
                        f"task {name!r}: backend {backend.info.name!r} cannot run "
                        f"{kind.value} tasks ({caps.why_not(need)}); route it to "
                        "another backend with backend=..."
                    )
            return TaskDecl(self, f, kind, options, backend)

        if fn is None:
            return make
        if opts:
            raise TaskDefinitionError(
                "pass options as keywords: @flow.function_task(retries=2)"
            )
        return make(fn)

    def _backend_for(self, name: str | None, task: str) -> ExecutionBackend:
        if name is None:
            return self._backends[self._default]
        try:
            return self._backends[name]
        except KeyError:
            raise TaskDefinitionError(
                f"task {task!r}: unknown backend {name!r}; this engine has "
                f"{sorted(self._backends)}"
            ) from None

    # -- loop binding and backend start ---------------------------------------
    def _bind(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._closed:
            raise EngineClosedError(
                "this WorkflowEngine was shut down; create a new one to run more tasks"
            )
        if self._loop is loop:
            return
        if self._loop is not None and not self._loop.is_closed():
            raise AsyncflowError(
                "this WorkflowEngine belongs to another event loop; call tasks from "
                "the loop that runs it (from another thread use "
                "asyncio.run_coroutine_threadsafe)"
            )
        self._loop = loop
        self._sink = _Sink(self, loop)
        self._guard = loop.create_task(self._shut_down_with_loop())
        for backend in self._backends.values():
            key = id(backend)
            if key not in self._starting:
                self._queues[key] = []
                self._starting[key] = loop.create_task(self._start_backend(backend))

    async def _shut_down_with_loop(self) -> None:
        """Shut down when the loop ends (asyncio.run cancels leftover tasks on
        Ctrl-C, on an escaping exception, or when the user forgot shutdown())."""
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self._guard = None  # shutdown() must not cancel the task running it
            if not self._closed:
                await self.shutdown()
            raise

    async def _start_backend(self, backend: ExecutionBackend) -> None:
        assert self._sink is not None
        try:
            await backend.start(self._sink)
        except BaseException as exc:
            queued, self._queues[id(backend)] = self._queues[id(backend)], []
            for spec in queued:
                fut = self._inflight.pop(spec.uid, None)
                if fut is not None:
                    self._finish_error(
                        fut,
                        exc
                        if isinstance(exc, Exception)
                        else AsyncflowError(f"backend start: {exc!r}"),
                    )
            raise
        self._started[id(backend)] = backend
        if self._queues[id(backend)]:
            self._schedule_flush()

    # -- calling a task --------------------------------------------------------
    def _call(
        self, decl: TaskDecl, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> TaskFuture:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            raise TaskDefinitionError(
                f"task {decl.name!r} was called outside a running event loop; call "
                "tasks from async code (inside asyncio.run(...))"
            ) from None
        if loop is not self._loop or self._closed:
            self._bind(loop)
        uid = f"{decl.name}.{next(self._counter):06d}"
        fut = TaskFuture(self, decl, uid, loop)
        self._open[uid] = fut
        fut._args = args
        fut._kwargs = kwargs
        if self._subscribers:
            deps = collect_futures(args, kwargs) if (args or kwargs) else []
            self._emit(EventKind.CREATED, fut, tuple(d.uid for d in deps))
        if args or kwargs:
            pending = 0
            for dep in collect_futures(args, kwargs):
                state = dep._tstate
                if state is TaskState.DONE:
                    continue
                if state is TaskState.FAILED:
                    self._fail_dependents(dep, [fut])
                    return fut
                if state is TaskState.CANCELLED:
                    self._cancel(fut, None)
                    return fut
                if dep._dependents is None:
                    dep._dependents = [fut]
                else:
                    dep._dependents.append(fut)
                pending += 1
            if pending:
                fut._pending = pending
                if self._subscribers:
                    self._emit(EventKind.WAITING, fut)
                return fut
        self._ready(fut)
        return fut

    def _dep_done(self, fut: TaskFuture) -> None:
        fut._pending -= 1
        if fut._pending == 0 and fut._tstate is TaskState.WAITING:
            self._ready(fut)

    def _ready(self, fut: TaskFuture) -> None:
        """All dependencies are done: resolve the arguments and start the work."""
        decl = fut._decl
        kind = decl.kind
        target = decl.backend if kind is TaskKind.FUNCTION else None
        args, kwargs = fut._args, fut._kwargs
        remote = False
        if args or kwargs:
            deps = collect_futures(args, kwargs)
            if deps:
                fetch = [
                    d
                    for d in deps
                    if d._remote is not None and d._remote.owner is not target
                ]
                if fetch:
                    fut._job = asyncio.ensure_future(self._fetch_then_ready(fut, fetch))
                    return
                remote = any(d._remote is not None for d in deps)
                args = substitute(args, _value_of)
                kwargs = substitute(kwargs, _value_of)
        fut._args = fut._kwargs = None  # type: ignore[assignment]
        if kind is TaskKind.FUNCTION:
            assert target is not None
            opts = decl.opts
            spec = TaskSpec(
                fut.uid,
                decl.name,
                decl.fn,
                None,
                args,
                kwargs,
                opts.resources,
                opts.timeout,
                opts.options,
                0,
                decl.is_async,
                remote,
            )
            self._submit(fut, target, spec)
        elif kind is TaskKind.EXECUTABLE:
            if decl.is_async:
                fut._job = asyncio.ensure_future(self._run_body(fut, args, kwargs))
            else:
                try:
                    command = decl.fn(*args, **kwargs)
                except Exception as exc:
                    self._finish_error(fut, exc, retry=False)
                    return
                self._submit_command(fut, command)
        else:
            fut._job = asyncio.ensure_future(self._run_block(fut, args, kwargs))

    async def _fetch_then_ready(self, fut: TaskFuture, deps: list[TaskFuture]) -> None:
        try:
            await asyncio.gather(*deps)
        except Exception:
            pass  # a lost upstream value fails this task through the state below
        failed = [d for d in deps if d._tstate is TaskState.FAILED]
        if failed:
            self._fail_dependents(failed[0], [fut])
        elif fut._tstate is TaskState.WAITING:
            self._ready(fut)

    async def _run_body(
        self, fut: TaskFuture, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        try:
            command = await fut._decl.fn(*args, **kwargs)
        except Exception as exc:
            self._finish_error(fut, exc, retry=False)
            return
        fut._job = None
        self._submit_command(fut, command)

    def _submit_command(self, fut: TaskFuture, command: Any) -> None:
        decl = fut._decl
        opts = decl.opts
        try:
            cmd = Command.coerce(command, decl.name, opts.env, opts.cwd)
        except TaskDefinitionError as exc:
            self._finish_error(fut, exc, retry=False)
            return
        assert decl.backend is not None
        backend = decl.backend
        spec = TaskSpec(
            fut.uid,
            decl.name,
            None,
            cmd,
            (),
            {},
            opts.resources,
            opts.timeout,
            opts.options,
            0,
        )
        self._submit(fut, backend, spec)

    async def _run_block(
        self, fut: TaskFuture, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        decl = fut._decl
        timeout = decl.opts.timeout
        while True:
            try:
                value = decl.fn(*args, **kwargs)
                if asyncio.iscoroutine(value) or isinstance(value, asyncio.Future):
                    value = await (
                        asyncio.wait_for(value, timeout) if timeout else value
                    )
            except TimeoutError as exc:
                err: BaseException = exc
                if not isinstance(exc, TaskTimeoutError):
                    err = TaskTimeoutError(
                        f"block {decl.name!r} exceeded its timeout of {timeout}s"
                    )
            except Exception as exc:
                err = exc
            else:
                fut._job = None
                self._finish_ok(fut, value)
                return
            if fut._attempt < decl.opts.retries and not isinstance(err, _NOT_RETRIED):
                fut._attempt += 1
                continue
            fut._job = None
            self._finish_error(fut, err, retry=False)
            return

    # -- submission -----------------------------------------------------------
    def _submit(
        self, fut: TaskFuture, backend: ExecutionBackend, spec: TaskSpec
    ) -> None:
        fut._spec = spec
        fut._backend = backend
        fut._tstate = TaskState.SUBMITTED
        self._inflight[spec.uid] = fut
        self._queues[id(backend)].append(spec)
        if not self._flush_scheduled:
            self._schedule_flush()
        if self._subscribers:
            self._emit(EventKind.SUBMITTED, fut)
        if spec.timeout is not None:
            assert self._loop is not None
            fut._timer = self._loop.call_later(
                spec.timeout, self._on_timeout, fut, spec.uid
            )

    def _schedule_flush(self) -> None:
        assert self._loop is not None
        self._flush_scheduled = True
        self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        for key, backend in self._started.items():
            batch = self._queues[key]
            if not batch:
                continue
            self._queues[key] = []
            try:
                backend.submit(batch)
            except Exception as exc:
                log.exception("backend %s failed to accept a batch", backend.info.name)
                for spec in batch:
                    fut = self._inflight.pop(spec.uid, None)
                    if fut is not None:
                        self._finish_error(fut, exc, retry=False)

    def _on_timeout(self, fut: TaskFuture, spec_uid: str) -> None:
        fut._timer = None
        if self._inflight.pop(spec_uid, None) is None:
            return
        self._backend_cancel(fut._backend, [spec_uid])
        timeout = fut._spec.timeout if fut._spec else None
        self._finish_error(
            fut,
            TaskTimeoutError(
                f"task {fut.name!r} ({fut.uid}) exceeded its timeout of {timeout}s and "
                "was cancelled; raise timeout= or use retries="
            ),
        )

    # -- completion -------------------------------------------------------------
    def _finish_ok(self, fut: TaskFuture, value: Any) -> None:
        if fut._tstate in _FINAL:
            return
        if fut._timer is not None:
            fut._timer.cancel()
            fut._timer = None
        del self._open[fut.uid]
        fut._tstate = TaskState.DONE
        fut._spec = None
        if self._subscribers:
            self._emit(EventKind.DONE, fut)
        if isinstance(value, RemoteValue):
            fut._remote = value
            if fut._callbacks:  # somebody already waits: fetch now
                self._fetch(fut)
        else:
            _set_result(fut, value)
        dependents = fut._dependents
        if dependents is not None:
            fut._dependents = None
            for dep in dependents:
                dep._engine._dep_done(dep)

    def _finish_error(
        self, fut: TaskFuture, exc: BaseException, retry: bool = True
    ) -> None:
        if fut._tstate in _FINAL:
            return
        if fut._timer is not None:
            fut._timer.cancel()
            fut._timer = None
        spec = fut._spec
        if (
            retry
            and spec is not None
            and fut._attempt < fut._decl.opts.retries
            and not isinstance(exc, _NOT_RETRIED)
            and not self._closed
        ):
            fut._attempt += 1
            log.info(
                "retrying task %s (attempt %d) after %r", fut.uid, fut._attempt + 1, exc
            )
            if self._subscribers:
                self._emit(EventKind.RETRIED, fut)
            new = replace(spec, uid=f"{fut.uid}.r{fut._attempt}", attempt=fut._attempt)
            self._submit(fut, fut._backend, new)
            return
        self._open.pop(fut.uid, None)
        fut._tstate = TaskState.FAILED
        fut._spec = None
        fut._args = fut._kwargs = None  # type: ignore[assignment]
        if self._subscribers:
            self._emit(EventKind.FAILED, fut)
        _set_exception(fut, exc)
        if fut._dependents:
            self._fail_dependents(fut, fut._dependents)
            fut._dependents = None

    def _fail_dependents(
        self, failed: TaskFuture, dependents: list[TaskFuture]
    ) -> None:
        """Fail every (transitive) dependent at once, naming the failed upstream."""
        failed._log_traceback = False  # reported through the dependents instead
        exc = failed.exception()
        if isinstance(exc, DependencyFailureError):
            root, root_name = exc.__cause__, exc.root
        else:
            root, root_name = exc, failed.uid
        cause = f"{type(root).__name__}: {root}"
        stack = [(failed, d) for d in dependents]
        while stack:
            upstream, dep = stack.pop()
            if dep._tstate in _FINAL:
                continue
            err = DependencyFailureError(dep.uid, [upstream.uid], root_name, cause)
            err.__cause__ = root
            dep._engine._open.pop(dep.uid, None)
            dep._tstate = TaskState.FAILED
            dep._args = dep._kwargs = None  # type: ignore[assignment]
            if dep._job is not None:
                dep._job.cancel()
                dep._job = None
            if dep._engine._subscribers:
                dep._engine._emit(EventKind.FAILED, dep)
            _set_exception(dep, err)
            if dep._dependents:
                dep._log_traceback = False
                stack.extend((dep, d) for d in dep._dependents)
                dep._dependents = None

    # -- cancellation ---------------------------------------------------------
    def _cancel(self, fut: TaskFuture, msg: Any, notify: bool = True) -> bool:
        stack = [fut]
        to_backend: dict[int, tuple[ExecutionBackend, list[str]]] = {}
        while stack:
            f = stack.pop()
            if f._tstate in _FINAL:
                continue
            spec = f._spec
            if spec is not None and self._inflight.pop(spec.uid, None) is not None:
                entry = to_backend.setdefault(id(f._backend), (f._backend, []))
                entry[1].append(spec.uid)
            if f._timer is not None:
                f._timer.cancel()
                f._timer = None
            if f._job is not None:
                f._job.cancel()
                f._job = None
            f._engine._open.pop(f.uid, None)
            f._tstate = TaskState.CANCELLED
            f._spec = None
            f._args = f._kwargs = None  # type: ignore[assignment]
            if f._engine._subscribers:
                f._engine._emit(EventKind.CANCELLED, f)
            _future_cancel(f, msg)
            if f._dependents:
                stack.extend(f._dependents)
                f._dependents = None
        if notify:
            for backend, uids in to_backend.values():
                self._backend_cancel(backend, uids)
        return True

    def _backend_cancel(self, backend: ExecutionBackend, uids: list[str]) -> None:
        try:
            backend.cancel(uids)
        except Exception:
            log.exception("backend %s failed to cancel %s", backend.info.name, uids)

    # -- remote values ----------------------------------------------------------
    def _fetch(self, fut: TaskFuture) -> None:
        if fut._job is None and fut._remote is not None:
            fut._job = asyncio.ensure_future(self._do_fetch(fut))

    async def _do_fetch(self, fut: TaskFuture) -> None:
        remote = fut._remote
        assert remote is not None
        try:
            value = await remote.fetch()
        except Exception as exc:
            fut._remote = None
            fut._job = None
            fut._tstate = TaskState.FAILED
            _set_exception(fut, exc)
            return
        fut._remote = None
        fut._job = None
        _set_result(fut, value)

    # -- observability ----------------------------------------------------------
    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        """Call ``callback(TaskEvent)`` on every task state change, on the loop
        thread.  Returns a function that unsubscribes."""
        self._subscribers.append(callback)

        def unsubscribe() -> None:
            if callback in self._subscribers:
                self._subscribers.remove(callback)

        return unsubscribe

    def events(self) -> EventStream:
        """An async iterator of every event from now on."""
        stream = EventStream(lambda: unsubscribe())
        unsubscribe = self.subscribe(stream.queue.put_nowait)
        return stream

    def record_trace(self) -> TraceRecorder:
        """Start keeping one record per task, for :meth:`export_trace` and the
        critical path in :meth:`summary`."""
        if self._recorder is None:
            self._recorder = TraceRecorder()
            self.subscribe(self._recorder)
        return self._recorder

    def export_trace(self, path: str) -> str:
        """Write a Chrome trace-event JSON file (Perfetto, chrome://tracing)."""
        if self._recorder is None:
            raise AsyncflowError(
                "no trace was recorded: call flow.record_trace() before running "
                "tasks (or use `asyncflow run --trace FILE`)"
            )
        return str(self._recorder.export(path))

    def summary(self) -> dict[str, Any]:
        """Task counts by state and by backend, total and critical-path time
        (the times need :meth:`record_trace`)."""
        if self._recorder is not None:
            return self._recorder.summary()
        return {
            "tasks": None,
            "by_state": {},
            "by_backend": {},
            "total_time": None,
            "critical_path_time": None,
            "critical_path": [],
            "note": "call flow.record_trace() first for counts and times",
        }

    def _emit(
        self, kind: EventKind, fut: TaskFuture, deps: tuple[str, ...] = ()
    ) -> None:
        backend = fut._backend or fut._decl.backend
        label = self._labels.get(id(backend), "engine") if backend else "engine"
        event = TaskEvent(
            time.time(), kind, fut.uid, fut.name, label, fut._attempt, deps
        )
        for callback in list(self._subscribers):
            try:
                callback(event)
            except Exception:
                log.exception("event subscriber %r failed", callback)

    # -- shutdown -------------------------------------------------------------
    async def shutdown(self) -> None:
        """Cancel unfinished tasks and shut every backend down.  Idempotent."""
        if self._shutdown_task is None:
            self._closed = True
            self._shutdown_task = asyncio.ensure_future(self._shutdown())
        await asyncio.shield(self._shutdown_task)

    async def _shutdown(self) -> None:
        to_backend: dict[int, tuple[ExecutionBackend, list[str]]] = {}
        for fut in list(self._open.values()):
            if fut._tstate in (TaskState.SUBMITTED, TaskState.RUNNING) and fut._spec:
                entry = to_backend.setdefault(id(fut._backend), (fut._backend, []))
                entry[1].append(fut._spec.uid)
            self._cancel(fut, "engine shut down", notify=False)
        for backend, uids in to_backend.values():
            if id(backend) in self._started:
                self._backend_cancel(backend, uids)
        for task in self._starting.values():
            if not task.done():
                task.cancel()
        await asyncio.gather(*self._starting.values(), return_exceptions=True)
        if self._guard is not None:
            self._guard.cancel()
        errors = []
        for backend in self._backends.values():
            try:
                await backend.shutdown()
            except Exception as exc:  # keep shutting the others down
                log.exception("backend %s failed to shut down", backend.info.name)
                errors.append(exc)
        if errors:
            raise errors[0]


def _value_of(fut: TaskFuture) -> Any:
    remote = fut._remote
    if remote is not None:
        return remote
    return _future_result(fut)
