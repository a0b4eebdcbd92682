"""A process pool as the runtime of a :class:`~.toolkit.chunks.ChunkQueue`.

What is particular to ``ProcessPoolExecutor``: a submit may fork the pool's
workers, which must not happen while a command's ``Popen`` holds its pipes
open (see :data:`asyncflow.commands.FORK_LOCK`), and a worker that dies breaks
the whole pool, which the backend then replaces.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Executor, Future
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from ..commands import FORK_LOCK, guard_forks
from ..worker import Call, run_chunk

__all__ = ["PoolChunks"]


class PoolChunks:
    """``send`` and ``lost`` for a chunk queue on a process pool.

    ``executor`` returns the pool to use now; ``broken`` replaces it."""

    def __init__(self, executor: Callable[[], Executor], broken: Callable[[], None]):
        guard_forks()
        self._executor = executor
        self._broken = broken

    def send(self, calls: list[Call]) -> Future[Any]:
        try:
            with FORK_LOCK:
                return self._executor().submit(run_chunk, calls)
        except BrokenProcessPool:
            self._broken()  # a new pool replaces it; try once more there
            with FORK_LOCK:
                return self._executor().submit(run_chunk, calls)

    def lost(self, exc: BaseException) -> str | None:
        if not isinstance(exc, BrokenProcessPool):
            return None
        self._broken()
        return (
            "a worker of its process pool died while the task ran or waited "
            f"in that pool ({exc}); a dead worker breaks the whole pool, "
            "which was replaced: use retries= to re-run such tasks"
        )
