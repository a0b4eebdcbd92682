"""The bookkeeping a Parsl backend's collaborators share.

:class:`ParslExecutionBackend` owns one :class:`State`; the submitter, the
completions, the canceller and the watch each hold it and read or write only
what their job needs.  One explicit object, rather than attributes spread over
the backend, keeps every collaborator's dependencies visible and lets each be
built and tested on its own.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ...errors import WorkerLostError
from ...protocol import CompletionSink
from ..toolkit import Lifecycle, lost_error

if TYPE_CHECKING:
    from parsl.dataflow.dflow import DataFlowKernel

    from .executors import Profile
    from .runtime import Runtime

log = logging.getLogger("asyncflow.parsl")


class InterchangeLost(WorkerLostError):
    """An HTEX executor can run no more tasks (set as its bad state): its
    interchange exited.  Parsl keeps it as the executor's exception, and every
    task of that executor reports it."""

    def for_task(self, name: str) -> WorkerLostError:
        return WorkerLostError(f"task {name!r}: {self}")


class JobLost(InterchangeLost):
    """The batch job holding the executor's workers ended; the hint for the
    user depends on how (a walltime calls for a longer one)."""

    def for_task(self, name: str) -> WorkerLostError:
        return lost_error(name, str(self))


def bad_state(state: State, label: str) -> BaseException | None:
    """The exception Parsl raises for every task of executor ``label`` once it
    is marked bad (its interchange or batch job gone), or None while it runs."""
    dfk = state.dfk
    executor: Any = None if dfk is None else dfk.executors.get(label)
    # Parsl's ThreadPoolExecutor has no bad state
    if not getattr(executor, "bad_state_is_set", False):
        return None
    exc: BaseException = executor.executor_exception
    return exc


class Task:
    """One submitted spec, from the adapter's side."""

    __slots__ = ("command", "key", "label", "name", "packed")

    def __init__(self, name: str, key: str, command: bool, label: str, packed: bool):
        self.name = name
        self.key = key  # names the task's cancel marker: "af<pid>x<n>.<n>"
        self.command = command
        self.label = label
        self.packed = packed  # the result comes back pickled (see packed_task)


@dataclass(eq=False, slots=True)
class State:
    """What one backend tracks, from construction to shutdown."""

    runtime: Runtime
    profiles: dict[str, Profile]
    label: str  # the executor tasks go to unless options name another
    routable: bool  # options={"executor": ...} may pick another executor
    kill_functions: bool
    life: Lifecycle
    token: str  # prefix of this backend's task keys, unique per process
    counter: itertools.count[int] = field(default_factory=itertools.count)
    tasks: dict[str, Task] = field(default_factory=dict)
    cancelled: dict[str, Task] = field(default_factory=dict)  # until Parsl ends them
    sink: CompletionSink | None = None
    dfk: DataFlowKernel | None = None
