"""The protocol's lifecycle promises, kept in one object.

Every backend must refuse a second ``start()`` and a start after shutdown, must
make a second ``shutdown()`` harmless, and must not leave an asyncio task of its
own running after shutdown returns.  The flags and the task set travel
together because each adapter got one of them subtly wrong on its own.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

from ...errors import BackendStartError, EngineClosedError


class Lifecycle:
    """Started/closed guards and the background tasks a backend owns."""

    __slots__ = ("_log", "background", "closed", "kind", "loop", "started")

    def __init__(self, kind: str, log: logging.Logger):
        self.kind = kind  # the backend's class name, for the errors
        self._log = log
        self.started = False
        self.closed = False
        self.loop: asyncio.AbstractEventLoop | None = None
        self.background: set[asyncio.Task[Any]] = set()

    def begin_start(self) -> asyncio.AbstractEventLoop:
        """Mark the backend started on the running loop, or say why it cannot."""
        if self.closed:
            raise EngineClosedError(f"this {self.kind} was shut down")
        if self.started:
            raise BackendStartError(
                f"this {self.kind} is already started; give each engine a "
                "backend of its own"
            )
        self.started = True
        self.loop = asyncio.get_running_loop()
        return self.loop

    def begin_shutdown(self) -> bool:
        """True the first time only: the caller then does the shutting down."""
        if self.closed:
            return False
        self.closed = True
        return True

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run ``coro`` in the background until it ends or shutdown cancels it;
        its failure is logged, since nobody awaits it."""
        loop = self.loop or asyncio.get_running_loop()
        task = loop.create_task(coro)
        self.background.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self.background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self._log.error(
                "%s: background job failed", self.kind, exc_info=task.exception()
            )

    async def cancel_background(self) -> None:
        """Cancel every background task and wait until each has ended."""
        tasks = list(self.background)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
