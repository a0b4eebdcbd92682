"""The DAG machinery under :class:`~asyncflow.WorkflowEngine`.

Nothing here polls.  A task's future carries the list of its waiting dependents;
when a backend reports a completion (through the :class:`~asyncflow.sink.Sink`,
from any thread, batched onto the loop), that list is walked and every
dependent whose last dependency just finished is handed to
:class:`~asyncflow.dispatch.Dispatch`.  Failures and cancellations walk the
same lists, transitively and at once.

The futures' underscore slots are this module's node records: the scheduler
writes them, and its collaborators in the engine read them.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
from collections.abc import Callable, Collection, Sequence
from dataclasses import replace
from typing import Any

from .caching import WAIT
from .data import File
from .dispatch import NOT_RETRIED, Dispatch
from .errors import DependencyFailureError, TaskDefinitionError
from .events import EventKind
from .future import FINAL, LIVE, TaskFuture, TaskState
from .piping import Piping
from .protocol import ExecutionBackend, RemoteValue, UpstreamRef
from .state import EngineState
from .store import MISS
from .tasks import TaskDecl, TaskKind, collect_futures, substitute

__all__ = ["Scheduler"]

log = logging.getLogger("asyncflow")


class _Refused(Exception):
    """A piped task its backend refused (see ``Scheduler.refused``), held back
    like an outcome until its upstreams report."""


_set_result = asyncio.Future.set_result
_set_exception = asyncio.Future.set_exception
_future_cancel = asyncio.Future.cancel
_future_result = asyncio.Future.result


class Scheduler:
    """Task lifecycle: call, wait, ready, complete, fail, cancel, fetch."""

    def __init__(
        self,
        state: EngineState,
        bind: Callable[[asyncio.AbstractEventLoop], None],
    ):
        self._state = state
        self._bind = bind  # the engine's: binds it to a loop, starts backends
        self.dispatch = Dispatch(state, self)
        self._inflight = state.inflight
        self._open = state.open
        self._hub = state.hub
        self.piping = Piping(self)
        self._counter = itertools.count(1)

    # -- calling a task --------------------------------------------------------
    def call(
        self, decl: TaskDecl, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> TaskFuture:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            raise self._outside_loop(decl.name) from None
        state = self._state
        if loop is not state.loop or state.closed:
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
            files = state.files
            if files is not None and File.declared:  # no call until a file exists
                linked = files.link(fut, args, kwargs)
        if self._hub.subscribers:
            deps = (*found, *linked) if linked else found
            self._hub.task(EventKind.CREATED, fut, tuple(d.uid for d in deps))
        if (args or kwargs) and not self._wait_for(
            fut, [*found, *linked] if linked else found, piping=not linked
        ):
            return fut
        self.ready(fut)
        return fut

    def _outside_loop(self, name: str) -> TaskDefinitionError:
        loop = self._state.loop
        if loop is not None and loop.is_running():
            return TaskDefinitionError(
                f"task {name!r} was called from thread "
                f"{threading.current_thread().name!r} while the engine runs in "
                "another (is a task body calling tasks?); compose tasks in a "
                "@flow.block, or hand the call to the engine's loop with "
                "asyncio.run_coroutine_threadsafe"
            )
        return TaskDefinitionError(
            f"task {name!r} was called outside a running event loop; call "
            "tasks from async code (inside asyncio.run(...))"
        )

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
                self.fail_dependents(dep, [fut])
                return False
            if state is TaskState.CANCELLED:
                self.cancel(fut, None)
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
        if piping and self.piping.can_pipe(fut._decl, waiting):
            # Hand it to the runtime now, naming the running upstreams: the
            # runtime starts it the moment they finish, without a round trip
            # through this loop (see Capability.PIPELINE).
            fut._after = len(waiting)
            return True
        fut._pending = len(waiting)
        if self._hub.subscribers:
            self._hub.task(EventKind.WAITING, fut)
        return False

    def dep_done(self, fut: TaskFuture) -> None:
        """One dependency of ``fut`` finished well."""
        if fut._after:
            self.piping.dep_done(fut)
            return
        fut._pending -= 1
        if fut._pending == 0 and fut._tstate is TaskState.WAITING:
            self.ready(fut)

    # -- ready ------------------------------------------------------------------
    def refused(self, uids: Collection[str]) -> None:
        """The backend no longer knows an upstream of these piped specs: each
        goes again with its upstreams' values, once their reports are in."""
        for uid in uids:
            fut = self._inflight.pop(uid, None)
            if fut is not None:
                self.finish_error(fut, _Refused(uid))

    def _unpipe(self, fut: TaskFuture) -> None:
        """The adapter could not find a running upstream (it finished before the
        spec arrived): submit again, with the upstreams' values."""
        fut._tstate = TaskState.WAITING
        fut._spec = None
        fut._backend = None
        self.ready(fut)

    def ready(self, fut: TaskFuture) -> None:
        """All dependencies are done: resolve the arguments and start the work."""
        decl = fut._decl
        target = decl.backend if decl.kind is TaskKind.FUNCTION else None
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
        caching = self._state.caching
        if caching is not None:
            found = caching.key_function(fut, remote or bool(fut._after), self.ready)
            if found is not MISS:
                if found is not WAIT:  # WAIT: made ready again once it may run
                    self.cached(fut, found)
                return
        if fut._after:
            remote = True  # kept: see _unpipe
        else:
            fut._args = fut._kwargs = None  # type: ignore[assignment]
            fut._deps = ()
        self.dispatch.launch(fut, args, kwargs, remote)

    def cached(self, fut: TaskFuture, value: Any) -> None:
        """``fut``'s result came from the result store: done, without running."""
        if self._hub.subscribers:
            self._hub.task(EventKind.CACHED, fut)
        self.finish_ok(fut, value, stored=True)

    async def _fetch_then_ready(self, fut: TaskFuture, deps: list[TaskFuture]) -> None:
        try:
            await asyncio.gather(*deps)
        except Exception:
            pass  # a lost upstream value fails this task through the state below
        failed = [d for d in deps if d._tstate is TaskState.FAILED]
        if failed:
            self.fail_dependents(failed[0], [fut])
        elif fut._tstate is TaskState.WAITING:
            self.ready(fut)

    # -- completion -------------------------------------------------------------
    def _settle(
        self, fut: TaskFuture, state: TaskState, kind: EventKind, error: Any = None
    ) -> None:
        """What every end of a task shares, whichever end it is: no timer, no
        longer open, nothing kept for a run that will not happen, observers
        told.  The future itself is resolved by the caller."""
        if fut._timer is not None:
            fut._timer.cancel()
            fut._timer = None
        self._open.pop(fut.uid, None)
        if fut._cache_key is not None and state is not TaskState.DONE:
            self._state.caching.forget(fut)  # type: ignore[union-attr]
        fut._tstate = state
        fut._spec = fut._early = None
        fut._args = fut._kwargs = None  # type: ignore[assignment]
        fut._deps = ()
        if self._hub.subscribers:
            self._hub.task(kind, fut, error=error)

    def finish_ok(self, fut: TaskFuture, value: Any, stored: bool = False) -> None:
        if fut._tstate in FINAL:
            return
        if fut._after:  # piped, and an upstream's report is still to come
            fut._early = (True, value)
            return
        self._settle(fut, TaskState.DONE, EventKind.DONE)
        caching = None if stored or fut._cache_key is None else self._state.caching
        if isinstance(value, RemoteValue):
            fut._remote = value
            if fut._callbacks or caching:  # somebody waits, or the store does
                self.fetch(fut)
        else:
            if caching is not None:
                caching.record(fut, value)
            _set_result(fut, value)
        dependents = fut._dependents
        if dependents is not None:
            fut._dependents = None
            for dep in dependents:
                dep._scheduler.dep_done(dep)

    def finish_error(
        self, fut: TaskFuture, exc: BaseException, retry: bool = True
    ) -> None:
        if fut._tstate in FINAL:
            return
        if fut._after:  # piped: the upstreams' fate decides what this means
            fut._early = (False, exc)
            return
        if type(exc) is _Refused and fut._args is not None:
            self._unpipe(fut)
            return
        if fut._timer is not None:
            fut._timer.cancel()
            fut._timer = None
        if retry and self._retry(fut, exc):
            return
        self._settle(fut, TaskState.FAILED, EventKind.FAILED, exc)
        _set_exception(fut, exc)
        if fut._dependents:
            self.fail_dependents(fut, fut._dependents)
            fut._dependents = None

    def _retry(self, fut: TaskFuture, exc: BaseException) -> bool:
        """Submit ``fut`` again if its ``retries=`` allow; whether it was."""
        spec = fut._spec
        if (
            spec is None
            or fut._attempt >= fut._decl.opts.retries
            or isinstance(exc, NOT_RETRIED)
            or self._state.closed
        ):
            return False
        fut._attempt += 1
        log.info(
            "retrying task %s (attempt %d) after %r", fut.uid, fut._attempt + 1, exc
        )
        if self._hub.subscribers:
            self._hub.task(EventKind.RETRIED, fut)
        new = replace(spec, uid=f"{fut.uid}.r{fut._attempt}", attempt=fut._attempt)
        self.dispatch.submit(fut, fut._backend, new)
        return True

    def fail_dependents(self, failed: TaskFuture, dependents: list[TaskFuture]) -> None:
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
            if dep._tstate in FINAL:
                continue
            err = DependencyFailureError(dep.uid, [upstream.uid], root_name, cause)
            err.__cause__ = root
            dep._scheduler._drop(dep)
            dep._scheduler._settle(dep, TaskState.FAILED, EventKind.FAILED, err)
            _set_exception(dep, err)
            if dep._dependents:
                dep._log_traceback = False
                stack.extend((dep, d) for d in dep._dependents)
                dep._dependents = None

    def _drop(self, fut: TaskFuture) -> None:
        """Stop whatever runs for ``fut``: its spec in a runtime (a piped
        dependent is there already) and its helper coroutine."""
        spec = fut._spec
        if spec is not None and self._inflight.pop(spec.uid, None) is not None:
            Dispatch.cancel_in(fut._backend, [spec.uid])
        if fut._job is not None:
            fut._job.cancel()
            fut._job = None

    # -- cancellation ---------------------------------------------------------
    def cancel(self, fut: TaskFuture, msg: Any, notify: bool = True) -> bool:
        """Cancel ``fut`` and its dependents; ``notify=False`` leaves telling
        the backends to the caller (shutdown batches them)."""
        stack = [fut]
        to_backend: dict[int, tuple[ExecutionBackend, list[str]]] = {}
        while stack:
            f = stack.pop()
            if f._tstate in FINAL:
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
                Dispatch.cancel_in(backend, uids)
        return True

    def cancel_all(self, msg: str) -> dict[int, tuple[ExecutionBackend, list[str]]]:
        """Cancel every unfinished task; the specs each backend holds, for the
        caller to cancel in one call per backend."""
        to_backend: dict[int, tuple[ExecutionBackend, list[str]]] = {}
        for fut in list(self._open.values()):
            if fut._tstate in LIVE and fut._spec:
                entry = to_backend.setdefault(id(fut._backend), (fut._backend, []))
                entry[1].append(fut._spec.uid)
            self.cancel(fut, msg, notify=False)
        return to_backend

    # -- remote values ----------------------------------------------------------
    def fetch(self, fut: TaskFuture) -> None:
        """Bring a value a backend kept in its runtime into the driver."""
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
        caching = self._state.caching
        if caching is not None and fut._cache_key is not None:
            caching.record(fut, value)
        _set_result(fut, value)


def _value_of(fut: TaskFuture) -> Any:
    if fut._tstate is not TaskState.DONE:  # a piped upstream, still running
        assert fut._spec is not None
        return UpstreamRef(fut._backend, fut._spec.uid)
    remote = fut._remote
    if remote is not None:
        return remote
    return _future_result(fut)
