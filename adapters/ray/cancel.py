"""Cancelling: Ray's cancel for functions, the marker sweep for commands.

A running function can only be stopped with its worker (``force=True``): Ray's
non-forced cancel raises KeyboardInterrupt at the next bytecode, which neither
interrupts a blocking call nor survives ``except BaseException``.  A command
runs in a session of its own, so killing its worker would orphan it; it is
killed instead by the marker in its environment, wherever that is found.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import ray

from ..._util import run_in_thread
from .process import RayProcess, sweep_everywhere
from .state import RayState, log

__all__ = ["Canceller"]


class Canceller:
    """Cancels tasks in flight and kills the commands among them."""

    def __init__(self, state: RayState, process: RayProcess):
        self._state = state
        self._process = process

    def cancel(self, uids: Sequence[str]) -> None:
        state = self._state
        commands = []
        resolving = self._resolving(uids)
        for uid in uids:
            task = state.tasks.pop(uid, None)
            if task is None:
                continue
            state.cancelled[uid] = task.ref
            if uid in resolving:
                continue
            try:
                # A command is stopped by killing its process group below; the
                # worker may live on.  A function can only be stopped with it.
                ray.cancel(task.ref, force=not task.command, recursive=True)
            except Exception:  # already finished or Ray is going away
                log.debug("ray.cancel(%s) failed", uid, exc_info=True)
            if task.command:
                commands.append(f"{state.token}/{uid}")
        if commands and state.life.loop is not None:
            state.life.spawn(self._kill_commands(frozenset(commands)))

    def _resolving(self, uids: Sequence[str]) -> set[str]:
        """The piped tasks among ``uids`` whose upstreams are in flight or
        failed.

        Ray 2.60 aborts the driver (a CHECK failure in its task manager) when a
        task still resolving its arguments is cancelled and they resolve
        later, or when a task Ray is failing for a failed argument is
        cancelled while that failure is on its way.  Such a task is left
        alone: it fails with its upstreams or runs unseen; its report is
        dropped like any cancelled one's.  An upstream cancelled here is in
        flight until Ray reports it.
        """
        state = self._state
        tasks, cancelled, failed = state.tasks, state.cancelled, state.failed
        return {
            uid
            for uid in uids
            if (task := tasks.get(uid)) is not None
            and any(u in tasks or u in cancelled or u in failed for u in task.upstreams)
        }

    async def _kill_commands(self, targets: frozenset[str]) -> None:
        # Twice: a command may start in the instant between the first sweep and
        # Ray's cancel reaching its worker.
        for delay in (0.0, 1.0):
            await asyncio.sleep(delay)
            try:
                await run_in_thread(
                    sweep_everywhere,
                    self._state.token,
                    targets,
                    not self._process.owns,
                    name="asyncflow-ray-kill",
                )
            except Exception:
                log.warning("could not kill cancelled Ray commands", exc_info=True)
