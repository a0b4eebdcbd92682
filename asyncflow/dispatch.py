"""Handing ready tasks to their backends.

A task whose dependencies are in becomes work here: a function task becomes a
:class:`~asyncflow.spec.TaskSpec` at once, an executable task's body runs
first to produce its command, and a block runs as a coroutine on the loop.
Specs are queued per backend and everything queued in one loop turn goes to
its backend in one ``submit`` call, which is what makes a fan-out of ten
thousand tasks a handful of calls into the runtime.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from .caching import WAIT
from .errors import (
    DependencyFailureError,
    ResourceUnavailableError,
    SerializationError,
    TaskDefinitionError,
    TaskTimeoutError,
)
from .events import EventKind
from .future import TaskFuture, TaskState
from .protocol import ExecutionBackend
from .spec import Command, TaskSpec
from .store import MISS
from .tasks import TaskKind

if TYPE_CHECKING:
    from .scheduler import Scheduler
    from .state import EngineState

__all__ = ["NOT_RETRIED", "Dispatch"]

log = logging.getLogger("asyncflow")

#: errors that fail the same way every time: retrying them only wastes time
NOT_RETRIED = (
    TaskDefinitionError,
    SerializationError,
    ResourceUnavailableError,
    DependencyFailureError,
)


class Dispatch:
    """Turns ready tasks into work and submits it, one batch per loop turn."""

    def __init__(self, state: EngineState, scheduler: Scheduler):
        self._state = state
        self._scheduler = scheduler
        self._inflight = state.inflight
        self._queues = state.queues
        self._hub = state.hub
        self._flush_scheduled = False

    # -- launching -------------------------------------------------------------
    def launch(
        self,
        fut: TaskFuture,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        remote: bool,
    ) -> None:
        """Start the work of ``fut``, whose arguments are resolved."""
        decl = fut._decl
        kind = decl.kind
        if kind is TaskKind.FUNCTION:
            opts = decl.opts
            backend = decl.backend
            assert backend is not None
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
                opts.chunk and self._state.chunking,
            )
            self.submit(fut, backend, spec)
        elif kind is TaskKind.EXECUTABLE:
            if decl.is_async:
                fut._job = asyncio.ensure_future(self._run_body(fut, args, kwargs))
                return
            try:
                command = decl.fn(*args, **kwargs)
            except Exception as exc:
                self._scheduler.finish_error(fut, exc, retry=False)
                return
            self._submit_command(fut, command, args, kwargs)
        else:
            fut._job = asyncio.ensure_future(self._run_block(fut, args, kwargs))

    async def _run_body(
        self, fut: TaskFuture, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        try:
            command = await fut._decl.fn(*args, **kwargs)
        except Exception as exc:
            self._scheduler.finish_error(fut, exc, retry=False)
            return
        fut._job = None
        self._submit_command(fut, command, args, kwargs)

    def _submit_command(
        self,
        fut: TaskFuture,
        command: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> None:
        decl = fut._decl
        opts = decl.opts
        try:
            cmd = Command.coerce(command, decl.name, opts.env, opts.cwd, opts.capture)
        except TaskDefinitionError as exc:
            self._scheduler.finish_error(fut, exc, retry=False)
            return
        caching = self._state.caching
        if caching is not None:
            found = caching.key_command(
                fut,
                cmd,
                args,
                kwargs,
                lambda f: self._submit_command(f, command, args, kwargs),
            )
            if found is not MISS:
                if found is not WAIT:  # WAIT: submitted again once it may run
                    self._scheduler.cached(fut, found)
                return
        assert decl.backend is not None
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
        self.submit(fut, decl.backend, spec)

    async def _run_block(
        self, fut: TaskFuture, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        decl = fut._decl
        while True:
            try:
                value = await self._block_once(fut, args, kwargs)
            except Exception as exc:
                err = exc
            else:
                fut._job = None
                self._scheduler.finish_ok(fut, value)
                return
            if fut._attempt < decl.opts.retries and not isinstance(err, NOT_RETRIED):
                fut._attempt += 1
                continue
            fut._job = None
            self._scheduler.finish_error(fut, err, retry=False)
            return

    @staticmethod
    async def _block_once(
        fut: TaskFuture, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        decl = fut._decl
        timeout = decl.opts.timeout
        try:
            value = decl.fn(*args, **kwargs)
            if asyncio.iscoroutine(value) or isinstance(value, asyncio.Future):
                value = await (asyncio.wait_for(value, timeout) if timeout else value)
        except TimeoutError as exc:
            if isinstance(exc, TaskTimeoutError):
                raise
            raise TaskTimeoutError(
                f"block {decl.name!r} exceeded its timeout of {timeout}s"
            ) from exc
        return value

    # -- submission -----------------------------------------------------------
    def submit(
        self, fut: TaskFuture, backend: ExecutionBackend, spec: TaskSpec
    ) -> None:
        """Queue ``spec`` for ``backend``'s next batch."""
        fut._spec = spec
        fut._backend = backend
        fut._tstate = TaskState.SUBMITTED
        self._inflight[spec.uid] = fut
        self._queues[id(backend)].append(spec)
        if not self._flush_scheduled:
            self.schedule_flush()
        if self._hub.subscribers:
            self._hub.task(EventKind.SUBMITTED, fut)
        if fut._decl.opts.service:
            self._state.services.submitted(fut, backend, spec.uid)
        if spec.timeout is not None:
            loop = self._state.loop
            assert loop is not None
            fut._timer = loop.call_later(spec.timeout, self._on_timeout, fut, spec.uid)

    def schedule_flush(self) -> None:
        loop = self._state.loop
        assert loop is not None
        self._flush_scheduled = True
        loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        inflight = self._inflight
        services = self._state.services
        for key, backend in self._state.started.items():
            batch = self._queues[key]
            if not batch:
                continue
            self._queues[key] = []
            # A task cancelled (or timed out) since it was queued has left
            # inflight; the backend must never see it, or it would run unseen.
            batch = [spec for spec in batch if spec.uid in inflight]
            if not batch:
                continue
            try:
                refused = backend.submit(batch)
            except Exception as exc:
                log.exception("backend %s failed to accept a batch", backend.info.name)
                self.fail_queued(batch, exc)
                continue
            if refused:
                self._scheduler.refused(refused)
            if services.live:
                services.accepted(backend, batch)

    def fail_queued(self, specs: list[TaskSpec], exc: BaseException) -> None:
        """Fail the tasks behind ``specs``, which their backend never took."""
        for spec in specs:
            fut = self._inflight.pop(spec.uid, None)
            if fut is not None:
                self._scheduler.finish_error(fut, exc, retry=False)

    def _on_timeout(self, fut: TaskFuture, spec_uid: str) -> None:
        fut._timer = None
        if self._inflight.pop(spec_uid, None) is None:
            return
        self.cancel_in(fut._backend, [spec_uid])
        timeout = fut._spec.timeout if fut._spec else None
        self._scheduler.finish_error(
            fut,
            TaskTimeoutError(
                f"task {fut.name!r} ({fut.uid}) exceeded its timeout of {timeout}s and "
                "was cancelled; raise timeout= or use retries="
            ),
        )

    @staticmethod
    def cancel_in(backend: ExecutionBackend, uids: list[str]) -> None:
        """Tell ``backend`` to drop ``uids``; its failure is logged, not raised."""
        try:
            backend.cancel(uids)
        except Exception:
            log.exception("backend %s failed to cancel %s", backend.info.name, uids)
