"""The future a task call returns.

It *is* an :class:`asyncio.Future`, so ``await``, ``asyncio.gather``, ``wait``,
``as_completed``, ``wait_for`` and ``shield`` all work unchanged and no wrapper task
is created per await.  It adds the task's ``uid``, ``name`` and ``state``.

A result that a backend kept in its runtime (a :class:`~asyncflow.protocol.
RemoteValue`) is only fetched into the driver when somebody waits on the future,
so a 200 MB hand-off between two tasks on the same backend never touches the
driver unless asked for.  Until then the task's ``state`` is ``DONE`` while
:meth:`done` is still ``False``.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .protocol import RemoteValue
    from .scheduler import Scheduler
    from .spec import TaskSpec
    from .tasks import TaskDecl

__all__ = ["TaskFuture", "TaskState"]


class TaskState(str, enum.Enum):
    WAITING = "waiting"  # dependencies not finished yet
    SUBMITTED = "submitted"  # handed to the backend
    RUNNING = "running"  # the backend said it started
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


#: the states a task never leaves
FINAL = (TaskState.DONE, TaskState.FAILED, TaskState.CANCELLED)
#: the states of a task its backend holds
LIVE = (TaskState.SUBMITTED, TaskState.RUNNING)


class TaskFuture(asyncio.Future):
    """Awaitable handle of one task call."""

    # Engine bookkeeping lives here, not in side tables, so that a finished task
    # is garbage as soon as the user drops its future.
    __slots__ = (
        "_after",
        "_args",
        "_attempt",
        "_backend",
        "_cache_key",
        "_decl",
        "_dependents",
        "_deps",
        "_early",
        "_job",
        "_kwargs",
        "_pending",
        "_remote",
        "_scheduler",
        "_spec",
        "_timer",
        "_tstate",
        "name",
        "uid",
    )

    def __init__(
        self,
        scheduler: Scheduler,
        decl: TaskDecl,
        uid: str,
        loop: asyncio.AbstractEventLoop,
    ):
        super().__init__(loop=loop)
        self._scheduler = scheduler
        self._decl = decl
        self.uid = uid
        self.name = decl.name
        self._tstate = TaskState.WAITING
        self._cache_key: str | None = None  # its result-store key, once ready
        self._dependents: list[TaskFuture] | None = None
        self._pending = 0
        # piped tasks (Capability.PIPELINE): upstreams still to report, and an
        # outcome the runtime reported before they did
        self._after = 0
        self._early: tuple[bool, Any] | None = None
        self._args: tuple[Any, ...] = ()
        self._kwargs: dict[str, Any] = {}
        # the futures among args/kwargs, found once when the task is called
        self._deps: Sequence[TaskFuture] = ()
        self._backend: Any = None
        self._attempt = 0
        self._timer: asyncio.TimerHandle | None = None
        self._remote: RemoteValue | None = None
        # the helper asyncio task of this future, if any: an executable body, a
        # block's coroutine, or a fetch of a remote value
        self._job: asyncio.Task[Any] | None = None
        self._spec: TaskSpec | None = None

    @property
    def state(self) -> TaskState:
        return self._tstate

    def cancel(self, msg: Any = None) -> bool:
        """Cancel the task: drop it if pending, stop it if running, and cancel
        every task that depends on it."""
        if self._tstate in FINAL:
            return False
        return self._scheduler.cancel(self, msg)

    # -- lazy remote values -------------------------------------------------
    def add_done_callback(self, fn: Any, *, context: Any = None) -> None:
        if self._remote is not None:
            self._scheduler.fetch(self)
        super().add_done_callback(fn, context=context)

    def result(self) -> Any:
        if self._remote is not None:
            raise asyncio.InvalidStateError(
                f"task {self.name!r} finished but its value is still on the "
                "backend; `await` the future to fetch it"
            )
        return super().result()

    def __repr__(self) -> str:
        return f"<TaskFuture {self.uid} {self._tstate.value}>"
