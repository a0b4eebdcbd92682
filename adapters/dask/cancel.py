"""Cancelling tasks in Dask, and killing the commands they run.

The engine cancels synchronously, often many tasks in one loop turn (a failed
upstream takes its whole subtree with it), while Dask cancels through a
scheduler round trip.  So ``cancel`` forgets the tasks at once and queues them;
one background job per loop turn cancels the queue in Dask with one message and
asks the workers, with one ``client.run``, to kill the commands among them (a
command runs in a session of its own, which Dask's cancel does not reach).
Shutdown waits for those jobs rather than cancelling them: they are what stops
running commands.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Any

from .config import CLOSE_TIMEOUT
from .state import DaskState, Tracked, log
from .worker import kill_on_worker


class Canceller:
    """Batches cancellations per loop turn; stops whatever is left at shutdown."""

    def __init__(self, state: DaskState):
        self._state = state
        self._queue: list[tuple[str, Tracked]] = []
        self._stops: set[asyncio.Task[Any]] = set()

    def cancel(self, uids: Sequence[str]) -> None:
        state = self._state
        queue = self._queue
        for uid in uids:
            tracked = state.forget(uid)
            if tracked is None:
                state.deferred.discard(uid)
                continue
            tracked.watcher.cancel()
            state.pushed.pop(tracked.key, None)
            if not queue:
                assert state.life.loop is not None
                state.life.loop.call_soon(self._flush)
            queue.append((uid, tracked))

    def _flush(self) -> None:
        batch, self._queue = self._queue, []
        if batch and not self._state.life.closed:
            task = self._state.life.spawn(self._stop(batch))
            self._stops.add(task)
            task.add_done_callback(self._stops.discard)

    async def _stop(self, batch: list[tuple[str, Tracked]]) -> None:
        """Cancel ``batch`` in Dask and kill its running commands."""
        client = self._state.client
        if client is None or client.status != "running":
            return
        jobs: list[Any] = [client.cancel([t.future for _, t in batch], force=True)]
        kills = [(uid, t.key) for uid, t in batch if t.is_command]
        if kills:
            jobs.append(client.run(kill_on_worker, kills, on_error="return"))
        for r in await asyncio.gather(*jobs, return_exceptions=True):
            if isinstance(r, Exception) and not self._state.life.closed:
                log.warning("dask: cancelling %d task(s) failed: %r", len(batch), r)

    async def stop_all(self) -> list[asyncio.Task[None]]:
        """At shutdown: stop every task still tracked or queued, and wait (within
        ``CLOSE_TIMEOUT``) for the stops under way; the watchers, cancelled, are
        the caller's to await."""
        state = self._state
        tasks, state.tasks = state.tasks, {}
        batch = [*self._queue, *tasks.items()]
        self._queue = []
        for _, tracked in batch:
            tracked.watcher.cancel()
        client = state.client
        if client is not None and batch and client.status == "running":
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._stop(batch), CLOSE_TIMEOUT)
        if self._stops:
            await asyncio.wait(list(self._stops), timeout=CLOSE_TIMEOUT)
        return [t.watcher for _, t in batch]
