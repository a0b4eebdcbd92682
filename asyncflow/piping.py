"""Tasks handed to their runtime before their upstreams finish.

On a backend that declares :attr:`~asyncflow.protocol.Capability.PIPELINE`, a
function task whose upstreams are running on the same backend is submitted at
once, naming them; the runtime starts it the moment they finish, so a chain
costs no round trip through the driver per hop.  The price is ordering: the
runtime may report a piped task before its upstreams, so such a report is held
back here until the upstreams' own reports arrive.
"""

from __future__ import annotations

import collections
from typing import TYPE_CHECKING, Any

from .future import FINAL, LIVE, TaskFuture
from .protocol import Capability
from .tasks import TaskDecl, TaskKind

if TYPE_CHECKING:
    from .scheduler import Scheduler

__all__ = ["Piping"]


class Piping:
    """Which calls may be piped, and the reports held back for them."""

    def __init__(self, scheduler: Scheduler):
        self._scheduler = scheduler
        self._pipes: dict[int, bool] = {}  # backend id -> declares PIPELINE
        self._replay: collections.deque[tuple[TaskFuture, tuple[bool, Any]]] = (
            collections.deque()
        )

    def can_pipe(self, decl: TaskDecl, deps: list[TaskFuture]) -> bool:
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
                or dep._tstate not in LIVE
                or dep._decl.kind is not TaskKind.FUNCTION
                or dep._attempt < dep._decl.opts.retries
                or dep._decl.opts.service  # its value comes before its end
            ):
                return False
        return True

    def dep_done(self, fut: TaskFuture) -> None:
        fut._after -= 1
        if fut._after or fut._tstate in FINAL:
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
                self._scheduler.finish_ok(f, value)
            else:
                self._scheduler.finish_error(f, value)
            replay.popleft()
