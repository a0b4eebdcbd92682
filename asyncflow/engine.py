"""The workflow engine: decorators, backends, start-up, observability, shutdown.

The engine composes the parts that run the DAG, which share one
:class:`~asyncflow.state.EngineState`: the :class:`~asyncflow.scheduler.Scheduler`
(dependencies, completion, failure, cancellation), its
:class:`~asyncflow.dispatch.Dispatch` (work handed to backends), the
:class:`~asyncflow.sink.Sink` (reports coming back) and the
:class:`~asyncflow.services.Services`.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Mapping
from typing import Any, overload

from . import _signals
from .caching import Caching
from .checks import Backends, check_service, named_backends, protocol_gaps, require
from .data import FileLinks
from .description import declared_default, merge, translate
from .errors import (
    AsyncflowError,
    EngineClosedError,
    TaskDefinitionError,
)
from .events import EventStream, Subscriber, TraceRecorder
from .output import DEFAULT
from .protocol import Capability, ExecutionBackend
from .scheduler import Scheduler
from .services import Services
from .sink import Sink
from .state import EngineState, EventHub
from .store import ResultStore
from .tasks import TaskDecl, TaskKind, TaskOptions

__all__ = ["WorkflowEngine"]

log = logging.getLogger("asyncflow")
log.addHandler(logging.NullHandler())

#: Called with every new engine; ``asyncflow run`` uses it to attach tracing and
#: progress to engines the user's script creates.
creation_hooks: list[Callable[[WorkflowEngine], None]] = []


class WorkflowEngine:
    """Runs decorated tasks on backends, wiring futures into a DAG.

    ``backend`` is one backend, a ``{name: backend}`` dict (the first is the
    default), a list of backends known by their ``info.name`` (radical.asyncflow's
    form of the dict), or ``None`` for the default: ``$ASYNCFLOW_BACKEND`` if set,
    else a thread pool.  The constructor is synchronous and may run in or out of
    an event loop: the engine binds to the loop that first uses it.

    ``dry_run=True`` runs nothing: every task resolves on a
    :class:`~asyncflow.adapters.noop.NoopExecutionBackend` in dependency order,
    and backends passed in are left untouched (not started, not shut down), so
    the same script checks its shape by flipping one flag.  ``implicit_data``
    links a task reading ``InputFile(p)`` to the task that declared
    ``OutputFile(p)``.

    Backends that can run many short calls per runtime call (the process pool,
    Ray, Dask, Parsl) do so for big batches of short function tasks;
    ``chunking=False`` here, or ``chunk=False`` on one task's decorator, sends
    each such task alone.  Turn it off for tasks that must each have a runtime
    identity of their own (a runtime dashboard per task, a per-task Ray
    ``runtime_env``), or when a task's run time varies so much between calls
    that the measured average misleads; results and errors are the same
    either way.

    The engine owns the backends handed to it: :meth:`shutdown` shuts each one
    down.  Each backend in turn only stops runtime resources it started itself
    (see the adapters).
    """

    def __init__(
        self,
        backend: Backends | None = None,
        *,
        dry_run: bool = False,
        implicit_data: bool = True,
        chunking: bool = True,
        store: str | os.PathLike[str] | ResultStore | None = None,
        refresh: bool = False,
    ):
        backends = named_backends(backend, dry_run)
        self.dry_run = dry_run
        self.implicit_data = implicit_data
        for name, b in backends.items():
            gaps = protocol_gaps(b)
            if gaps:
                raise TaskDefinitionError(
                    f"backend {name!r} ({b!r}) does not implement the asyncflow "
                    f"backend protocol: {'; '.join(gaps)}.  An adapter has `info`, "
                    "`async def start(sink)`, `submit(specs)`, `cancel(uids)` and "
                    "`async def shutdown()` (see asyncflow.protocol)"
                )
        self._backends: dict[str, ExecutionBackend] = backends
        self._default = next(iter(backends))
        named = isinstance(backend, Mapping | list | tuple) or dry_run
        hub = EventHub(
            {id(b): (name if named else b.info.name) for name, b in backends.items()}
        )
        state = self._state = EngineState(hub, FileLinks() if implicit_data else None)
        state.chunking = bool(chunking)
        state.caching = _caching(store, refresh)
        #: the DAG machinery; task calls go straight to it
        self.scheduler = Scheduler(state, self._bind)
        state.services = Services(state, self.scheduler)
        self._sink: Sink | None = None
        self._starting: dict[int, asyncio.Task[None]] = {}
        self._shutdown_task: asyncio.Future[None] | None = None
        self._guard: asyncio.Task[None] | None = None
        self._recorder: TraceRecorder | None = None
        for hook in creation_hooks:
            hook(self)

    @property
    def store(self) -> ResultStore | None:
        """The result store given as ``store=`` (or ``$ASYNCFLOW_STORE``)."""
        caching = self._state.caching
        return None if caching is None else caching.store

    # -- construction helpers ------------------------------------------------
    @classmethod
    async def create(
        cls,
        backend: Any = None,
        *,
        dry_run: bool = False,
        implicit_data: bool = True,
        chunking: bool = True,
    ) -> WorkflowEngine:
        """Build an engine and wait until its backends have started."""
        engine = cls(
            backend, dry_run=dry_run, implicit_data=implicit_data, chunking=chunking
        )
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

    @property
    def closed(self) -> bool:
        """Whether :meth:`shutdown` was called."""
        return self._state.closed

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
        described = opts.pop("task_description", None)

        def make(f: Any) -> TaskDecl:
            name = getattr(f, "__name__", repr(f))
            if not callable(f):
                return TaskDecl(self, f, kind, TaskOptions())  # raises the clear error
            backend: ExecutionBackend | None = None
            if kind is not TaskKind.BLOCK:
                backend = self._backend_for(opts.get("backend"), name)
            description = merge(declared_default(f, name), described)
            options = TaskOptions.build(
                name, **translate(description, name, backend, opts)
            )
            if backend is not None:
                function = kind is TaskKind.FUNCTION
                require(
                    backend,
                    Capability.FUNCTIONS if function else Capability.EXECUTABLES,
                    f"task {name!r}: backend {backend.info.name!r} cannot run "
                    f"{kind.value} tasks ({{why}}); route it to another backend "
                    "with backend=...",
                )
            if options.service:
                check_service(name, kind, backend)
            if kind is not TaskKind.EXECUTABLE and options.capture != DEFAULT:
                raise TaskDefinitionError(
                    f"task {name!r}: stdout=, stderr=, text= and output_limit= "
                    "are for executable tasks; a function returns its value"
                )
            decl = TaskDecl(self, f, kind, options, backend)
            decl.described = (description, dict(opts))
            return decl

        if fn is None:
            return make
        if opts or described is not None:
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
        state = self._state
        if state.closed:
            raise EngineClosedError(
                "this WorkflowEngine was shut down; create a new one to run more tasks"
            )
        if state.loop is loop:
            return
        if state.loop is not None and not state.loop.is_closed():
            raise AsyncflowError(
                "this WorkflowEngine belongs to another event loop; call tasks from "
                "the loop that runs it (from another thread use "
                "asyncio.run_coroutine_threadsafe)"
            )
        state.loop = loop
        self._sink = Sink(self.scheduler, state, loop)
        self._guard = loop.create_task(self._shut_down_with_loop())
        _signals.watch(loop)
        for backend in self._backends.values():
            key = id(backend)
            if key not in self._starting:
                state.queues[key] = []
                self._starting[key] = loop.create_task(self._start_backend(backend))

    async def _shut_down_with_loop(self) -> None:
        """Shut down when the loop ends (asyncio.run cancels leftover tasks on
        Ctrl-C, on an escaping exception, or when the user forgot shutdown())."""
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self._guard = None  # shutdown() must not cancel the task running it
            if not self._state.closed:
                await self.shutdown()
            raise

    async def _start_backend(self, backend: ExecutionBackend) -> None:
        assert self._sink is not None
        queues = self._state.queues
        try:
            await backend.start(self._sink)
        except BaseException as exc:
            queued, queues[id(backend)] = queues[id(backend)], []
            self.scheduler.dispatch.fail_queued(
                queued,
                exc
                if isinstance(exc, Exception)
                else AsyncflowError(f"backend start: {exc!r}"),
            )
            raise
        self._state.started[id(backend)] = backend
        if queues[id(backend)]:
            self.scheduler.dispatch.schedule_flush()

    # -- observability ----------------------------------------------------------
    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        """Call ``callback(TaskEvent)`` on every task state change, on the loop
        thread.  Returns a function that unsubscribes."""
        return self._state.hub.subscribe(callback)

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
        return str(self._recorded("--trace").export(path))

    def export_report(self, path: str) -> str:
        """Write the run so far as one HTML file that opens offline: the DAG,
        a timeline per backend slot, the critical path, utilisation, failures
        with their root causes (see :mod:`asyncflow.report_html`)."""
        from .report_html import write_report

        recorder = self._recorded("--report")
        return str(write_report(path, [recorder], extra=self._store_counts()))

    def _recorded(self, option: str) -> TraceRecorder:
        if self._recorder is None:
            raise AsyncflowError(
                "no trace was recorded: call flow.record_trace() before running "
                f"tasks (or use `asyncflow run {option} FILE`)"
            )
        return self._recorder

    def _store_counts(self) -> dict[str, int]:
        c = self._state.caching
        return {} if c is None else {"cached": c.hits, "stored": c.stored}

    def summary(self) -> dict[str, Any]:
        """Task counts by state and by backend, total and critical-path time
        (the times need :meth:`record_trace`); with a result store, how many
        tasks it answered (``cached``) and how many results it took."""
        return {**self._summary(), **self._store_counts()}

    def _summary(self) -> dict[str, Any]:
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

    # -- shutdown -------------------------------------------------------------
    async def shutdown(self, skip_execution_backend: bool = False) -> None:
        """Cancel unfinished tasks and shut every backend down.  Idempotent.

        ``skip_execution_backend=True`` leaves the backends running, for the
        caller to shut down or hand to another engine."""
        if self._shutdown_task is None:
            self._state.closed = True
            self._shutdown_task = asyncio.ensure_future(
                self._shutdown(skip_execution_backend)
            )
        await asyncio.shield(self._shutdown_task)

    async def _shutdown(self, skip_backends: bool) -> None:
        self._cancel_in_backends()
        for task in self._starting.values():
            if not task.done():
                task.cancel()
        await asyncio.gather(*self._starting.values(), return_exceptions=True)
        if self._guard is not None:
            self._guard.cancel()
        if self._state.caching is not None:
            self._state.caching.close()
        if not skip_backends:
            await self._shutdown_backends()

    def _cancel_in_backends(self) -> None:
        """Cancel the unfinished tasks and services, in the backends that started."""
        state = self._state
        to_backend = self.scheduler.cancel_all("engine shut down")
        for key, (backend, uids) in state.services.stop_all().items():
            to_backend.setdefault(key, (backend, []))[1].extend(uids)
        for backend, uids in to_backend.values():
            if id(backend) in state.started:
                self.scheduler.dispatch.cancel_in(backend, uids)

    async def _shutdown_backends(self) -> None:
        """Shut every backend down, the others too when one fails; then raise
        the first failure."""
        errors = []
        for backend in self._backends.values():
            try:
                await backend.shutdown()
            except Exception as exc:  # keep shutting the others down
                log.exception("backend %s failed to shut down", backend.info.name)
                errors.append(exc)
        if errors:
            raise errors[0]


def _caching(store: Any, refresh: bool) -> Caching | None:
    """``store=`` (a path or a :class:`ResultStore`), else ``$ASYNCFLOW_STORE``
    (set by ``asyncflow run --store``, with ``$ASYNCFLOW_REFRESH``)."""
    if store is None:
        store = os.environ.get("ASYNCFLOW_STORE") or None
        refresh = refresh or os.environ.get("ASYNCFLOW_REFRESH") == "1"
    if store is None:
        return None
    if not isinstance(store, ResultStore):
        store = ResultStore(store)
    return Caching(store, refresh)
