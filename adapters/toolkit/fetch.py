"""Remote values fetched in batches, with a bound on concurrent round trips.

A fan-in awaiting a thousand remote values must not make a thousand round
trips: everything asked for in one loop turn (or while earlier fetches were
in flight) goes in one call of the runtime's batch get.  A backend that shuts
down fails the waiting fetches instead of leaving them pending.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, TypeVar

from ...errors import EngineClosedError

R = TypeVar("R")


class Failed:
    """A fetch's failure, returned in place of a value by a batch get."""

    __slots__ = ("exc",)

    def __init__(self, exc: BaseException):
        self.exc = exc


#: fetches one batch of references, returning values or Failed in their order
GetMany = Callable[[list[R]], Awaitable[Sequence[Any]]]


class BatchedFetch(Generic[R]):
    """Collects fetches per loop turn and runs up to ``limit`` batches at once."""

    def __init__(
        self,
        get_many: GetMany[R],
        error: Callable[[BaseException, R], BaseException],
        log: logging.Logger,
        limit: int = 4,
    ):
        self._get_many = get_many
        self._error = error  # a runtime's failure as the error the caller sees
        self._log = log
        self._limit = limit
        self._queue: list[tuple[R, asyncio.Future[Any]]] = []
        self._scheduled = False
        self._running: set[asyncio.Task[None]] = set()
        self._closed: BaseException | None = None

    def fetch(self, ref: R) -> asyncio.Future[Any]:
        """A future for the value behind ``ref``."""
        if self._closed is not None:
            raise self._closed
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[Any] = loop.create_future()
        self._queue.append((ref, waiter))
        self._schedule(loop)
        return waiter

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        if not self._scheduled and len(self._running) < self._limit:
            self._scheduled = True
            loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        if not self._queue or self._closed or len(self._running) >= self._limit:
            return
        batch, self._queue = self._queue, []
        task = asyncio.get_running_loop().create_task(self._run(batch))
        self._running.add(task)
        task.add_done_callback(self._ran)

    def _ran(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self._log.error("fetch failed", exc_info=task.exception())
        if self._queue and self._closed is None:
            self._schedule(asyncio.get_running_loop())

    async def _run(self, batch: list[tuple[R, asyncio.Future[Any]]]) -> None:
        try:
            values = await self._get_many([ref for ref, _ in batch])
        except BaseException as exc:
            values = [Failed(exc)] * len(batch)
            if isinstance(exc, asyncio.CancelledError):
                self._fail(batch, self._closed or EngineClosedError(repr(exc)))
                raise
        for (ref, waiter), value in zip(batch, values, strict=True):
            if waiter.done():
                continue
            if isinstance(value, Failed):
                waiter.set_exception(self._error(value.exc, ref))
            else:
                waiter.set_result(value)

    @staticmethod
    def _fail(batch: list[tuple[Any, asyncio.Future[Any]]], exc: BaseException) -> None:
        for _, waiter in batch:
            if not waiter.done():
                waiter.set_exception(exc)

    async def close(self, exc: BaseException) -> None:
        """Fail every waiting fetch with ``exc`` and refuse new ones."""
        self._closed = exc
        queue, self._queue = self._queue, []
        self._fail(queue, exc)
        running = list(self._running)
        for task in running:
            task.cancel()
        if running:
            await asyncio.gather(*running, return_exceptions=True)
