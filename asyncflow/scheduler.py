"""The DAG machinery under :class:`~asyncflow.WorkflowEngine`.

Nothing here polls.  A task's future carries the list of its waiting dependents;
when a backend reports a completion (through :class:`_Sink`, from any thread,
batched onto the loop), that list is walked and every dependent whose last
dependency just finished is queued.  Everything queued in one loop turn goes to
its backend in one ``submit`` call.  Failures and cancellations walk the same
lists, transitively and at once.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from .data import File
from .errors import (
    DependencyFailureError,
    ResourceUnavailableError,
    SerializationError,
    TaskDefinitionError,
    TaskTimeoutError,
    UpstreamGone,
)
from .events import EventKind, Subscriber, TaskEvent
from .future import TaskFuture, TaskState
from .protocol import Capability, ExecutionBackend, RemoteValue, UpstreamRef
from .sink import _Sink
from .spec import Command, TaskSpec
from .tasks import TaskDecl, TaskKind, collect_futures, substitute

if TYPE_CHECKING:
    from .data import FileLinks
    from .services import Services

__all__ = ["Scheduler"]

log = logging.getLogger("asyncflow")

_FINAL = (TaskState.DONE, TaskState.FAILED, TaskState.CANCELLED)
_LIVE = (TaskState.SUBMITTED, TaskState.RUNNING)
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


class Scheduler:
    """Task lifecycle: call, wait, ready, submit, complete, fail, cancel."""

    _loop: asyncio.AbstractEventLoop | None
    _sink: _Sink | None
    _inflight: dict[str, TaskFuture]
    _open: dict[str, TaskFuture]
    _queues: dict[int, list[TaskSpec]]
    _started: dict[int, ExecutionBackend]
    _flush_scheduled: bool
    _closed: bool
    _subscribers: list[Subscriber]
    _labels: dict[int, str]
    _files: FileLinks | None  # None: implicit_data=False
    _services: Services
    _counter: Iterator[int]
    _pipes: dict[int, bool]
    _replay: collections.deque[tuple[TaskFuture, tuple[bool, Any]]]

    def _bind(self, loop: asyncio.AbstractEventLoop) -> None:
        raise NotImplementedError

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
        found: Sequence[TaskFuture] = ()
        linked = None
        if args or kwargs:
            found = fut._deps = collect_futures(args, kwargs)
            files = self._files
            if files is not None and File.declared:  # no call until a file exists
                linked = files.link(fut, args, kwargs)
        if self._subscribers:
            deps = (*found, *linked) if linked else found
            self._emit(EventKind.CREATED, fut, tuple(d.uid for d in deps))
        if (args or kwargs) and not self._wait_for(
            fut, [*found, *linked] if linked else found, piping=not linked
        ):
            return fut
        self._ready(fut)
        return fut

    def _wait_for(
        self, fut: TaskFuture, deps: Sequence[TaskFuture], piping: bool
    ) -> bool:
        """Tie a new task to its unfinished dependencies; whether it is to be
        handed over now (none left to wait for, or piped behind them)."""
        waiting: list[TaskFuture] | None = None
        for dep in deps:
            state = dep._tstate
            if state is TaskState.DONE:
                continue
            if state is TaskState.FAILED:
                self._fail_dependents(dep, [fut])
                return False
            if state is TaskState.CANCELLED:
                self._cancel(fut, None)
                return False
            if waiting is None:
                waiting = [dep]
            else:
                waiting.append(dep)
        if waiting is None:
            return True
        for dep in waiting:
            if dep._dependents is None:
                dep._dependents = [fut]
            else:
                dep._dependents.append(fut)
        if piping and self._can_pipe(fut._decl, waiting):
            # Hand it to the runtime now, naming the running upstreams: the
            # runtime starts it the moment they finish, without a round trip
            # through this loop (see Capability.PIPELINE).
            fut._after = len(waiting)
            return True
        fut._pending = len(waiting)
        if self._subscribers:
            self._emit(EventKind.WAITING, fut)
        return False

    def _dep_done(self, fut: TaskFuture) -> None:
        if fut._after:
            self._piped_dep_done(fut)
            return
        fut._pending -= 1
        if fut._pending == 0 and fut._tstate is TaskState.WAITING:
            self._ready(fut)

    # -- pipelining -------------------------------------------------------------
    def _can_pipe(self, decl: TaskDecl, deps: list[TaskFuture]) -> bool:
        """Whether a new call may go to its backend before ``deps`` finish.

        Only plain function tasks with no retries and no timeout are piped, on
        both ends: a retried upstream gets a new runtime identity, and a
        timeout must not count the time spent waiting for upstreams.
        """
        if decl.kind is not TaskKind.FUNCTION:
            return False
        opts = decl.opts
        if opts.retries or opts.timeout is not None:
            return False
        target = decl.backend
        ok = self._pipes.get(id(target))
        if ok is None:
            caps = target.info.capabilities  # type: ignore[union-attr]
            ok = self._pipes[id(target)] = Capability.PIPELINE in caps
        if not ok:
            return False
        for dep in deps:
            if (
                dep._backend is not target
                or dep._tstate not in _LIVE
                or dep._decl.kind is not TaskKind.FUNCTION
                or dep._attempt < dep._decl.opts.retries
                or dep._decl.opts.service  # its value comes before its end
            ):
                return False
        return True

    def _piped_dep_done(self, fut: TaskFuture) -> None:
        fut._after -= 1
        if fut._after or fut._tstate in _FINAL:
            return
        early, fut._early = fut._early, None
        if early is None:
            return  # still running in the runtime: its own report finishes it
        # Replaying a report can release the next held-back one, and so on down
        # a long chain: a loop, not recursion, so 10,000 hops cannot overflow.
        replay = self._replay
        replay.append((fut, early))
        if len(replay) > 1:
            return  # an outer call is draining
        while replay:
            f, (ok, value) = replay[0]
            if ok:
                self._finish_ok(f, value)
            else:
                self._finish_error(f, value)
            replay.popleft()

    def _unpipe(self, fut: TaskFuture) -> None:
        """The adapter could not find a running upstream (it finished before the
        spec arrived): submit again, with the upstreams' values."""
        fut._tstate = TaskState.WAITING
        fut._spec = None
        fut._backend = None
        self._ready(fut)

    def _ready(self, fut: TaskFuture) -> None:
        """All dependencies are done: resolve the arguments and start the work."""
        decl = fut._decl
        kind = decl.kind
        target = decl.backend if kind is TaskKind.FUNCTION else None
        args, kwargs = fut._args, fut._kwargs
        remote = False
        if args or kwargs:
            deps = fut._deps
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
                args, kwargs = substitute((args, kwargs), _value_of)
        if fut._after:
            remote = True  # kept: see _unpipe
        else:
            fut._args = fut._kwargs = None  # type: ignore[assignment]
            fut._deps = ()
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
        if fut._decl.opts.service:
            self._services.submitted(fut, backend, spec.uid)
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
        inflight = self._inflight
        for key, backend in self._started.items():
            batch = self._queues[key]
            if not batch:
                continue
            self._queues[key] = []
            # A task cancelled (or timed out) since it was queued has left
            # _inflight; the backend must never see it, or it would run unseen.
            batch = [spec for spec in batch if spec.uid in inflight]
            if not batch:
                continue
            try:
                backend.submit(batch)
            except Exception as exc:
                log.exception("backend %s failed to accept a batch", backend.info.name)
                for spec in batch:
                    fut = self._inflight.pop(spec.uid, None)
                    if fut is not None:
                        self._finish_error(fut, exc, retry=False)
            else:
                if self._services.live:
                    self._services.accepted(backend, batch)

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
    @staticmethod
    def _settle(fut: TaskFuture, state: TaskState, kind: EventKind) -> None:
        """What every end of a task shares, whichever end it is: no timer, no
        longer open, nothing kept for a run that will not happen, observers
        told.  The future itself is resolved by the caller."""
        if fut._timer is not None:
            fut._timer.cancel()
            fut._timer = None
        engine = fut._engine
        engine._open.pop(fut.uid, None)
        fut._tstate = state
        fut._spec = fut._early = None
        fut._args = fut._kwargs = None  # type: ignore[assignment]
        fut._deps = ()
        if engine._subscribers:
            engine._emit(kind, fut)

    def _finish_ok(self, fut: TaskFuture, value: Any) -> None:
        if fut._tstate in _FINAL:
            return
        if fut._after:  # piped, and an upstream's report is still to come
            fut._early = (True, value)
            return
        self._settle(fut, TaskState.DONE, EventKind.DONE)
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
        if fut._after:  # piped: the upstreams' fate decides what this means
            fut._early = (False, exc)
            return
        if isinstance(exc, UpstreamGone) and fut._args is not None:
            self._unpipe(fut)
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
        self._settle(fut, TaskState.FAILED, EventKind.FAILED)
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
            spec = dep._spec  # set: a piped dependent, already in its runtime
            inflight = dep._engine._inflight
            if spec is not None and spec.uid in inflight:
                del inflight[spec.uid]
                self._backend_cancel(dep._backend, [spec.uid])
            if dep._job is not None:
                dep._job.cancel()
                dep._job = None
            self._settle(dep, TaskState.FAILED, EventKind.FAILED)
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
            if f._job is not None:
                f._job.cancel()
                f._job = None
            self._settle(f, TaskState.CANCELLED, EventKind.CANCELLED)
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

    def _emit(
        self, kind: EventKind, fut: TaskFuture, deps: tuple[str, ...] = ()
    ) -> None:
        backend = fut._backend or fut._decl.backend
        label = self._labels.get(id(backend), "engine") if backend else "engine"
        self._publish(
            TaskEvent(time.time(), kind, fut.uid, fut.name, label, fut._attempt, deps)
        )

    def _emit_backend(self, backend: object, state: str, detail: str) -> None:
        label = self._labels.get(id(backend), "engine")
        self._publish(
            TaskEvent(time.time(), EventKind.BACKEND, "", state, label, 0, (), detail)
        )

    def _publish(self, event: TaskEvent) -> None:
        for callback in list(self._subscribers):
            try:
                callback(event)
            except Exception:
                log.exception("event subscriber %r failed", callback)


def _value_of(fut: TaskFuture) -> Any:
    if fut._tstate is not TaskState.DONE:  # a piped upstream, still running
        assert fut._spec is not None
        return UpstreamRef(fut._backend, fut._spec.uid)
    remote = fut._remote
    if remote is not None:
        return remote
    return _future_result(fut)
