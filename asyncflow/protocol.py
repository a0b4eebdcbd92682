"""The backend protocol: everything an adapter must do, and nothing more.

An adapter maps asyncflow's :class:`~asyncflow.spec.TaskSpec` onto a runtime.  The
engine owns the DAG (dependencies, failure propagation, retries, timeouts,
cancellation of dependents); an adapter only runs ready work and reports how it
ended.  The contract, in full:

``info``
    A :class:`BackendInfo`: the adapter's name, its runtime and version, and its
    :class:`Capabilities`.  Optional features are declared there rather than added
    as methods, and the conformance suite skips what is declared absent, quoting
    the adapter's reason.

``async start(sink)``
    Bring the runtime up (or attach to one) without blocking the event loop.  The
    engine calls it once, on its loop, before the first ``submit``.  ``sink`` is
    where completions go (see :class:`CompletionSink`).

``submit(specs)``
    Hand over a batch of ready tasks: everything that became ready in one loop
    turn arrives in one call.  Called on the loop; must not block.  Every spec
    must later be reported to the sink exactly once, as a result or an exception,
    unless it was cancelled first.  A spec the runtime can never run (resources
    it cannot meet, a function it cannot serialise) is reported at once as an
    exception naming the task.  The only exception to "every spec is reported"
    is a piped spec (see ``Capability.PIPELINE``) whose upstream the adapter no
    longer knows: ``submit`` returns its uid, unreported, among the uids it
    refuses, and the engine submits the task again with the upstreams' values.
    An adapter that never pipes returns ``None``.

``cancel(uids)``
    Stop these tasks if possible: drop them if pending, stop or kill them if
    running (see the ``CANCEL_QUEUED``, ``CANCEL_RUNNING`` and
    ``KILL_EXECUTABLES`` capabilities).
    The engine has already resolved the futures as cancelled; later reports for
    these uids are ignored.  Called on the loop; must not block.

``async shutdown()``
    Release everything the adapter created: processes, threads, temp directories.
    A runtime the adapter attached to but did not start is left running.
    Idempotent.

An adapter class may also carry a ``CAPABILITIES`` attribute so that tools such
as ``asyncflow backends`` can list what it supports without starting a runtime.
``info.capabilities`` is what the started object really supports (a runtime's
size can decide ``PARALLEL``); every capability left out of
``Capabilities.of(...)`` is given a reason, which the conformance suite quotes
when it skips the tests that need it.

What an adapter reports, and when
---------------------------------
Each is a :mod:`asyncflow.errors` class given to ``sink.set_exception`` with a
message that names the task and says what to do:

* the task's own exception, as its own type: run tasks through
  :func:`asyncflow.worker.run_spec` (or ``call_function`` and
  :func:`asyncflow.commands.run_command`),
  which also attach the worker's traceback and raise
  ``ExecutableFailedError`` for a command that exited non-zero;
* ``ResourceUnavailableError``, from ``submit`` at once, for ``resources=`` the
  runtime can never meet (more cores or GPUs than any worker has);
* ``SerializationError``, at once, for a function, argument or result that
  cannot be shipped to or from a worker;
* ``TaskDefinitionError``, at once, for a spec this runtime cannot run at all
  (a missing ``cwd``, an option it does not know);
* ``WorkerLostError`` for every task that was running on a worker that died
  (``os._exit``, a segfault, the OOM killer, a lost node), as soon as the runtime
  notices, never as a hang.  The backend must stay usable: later tasks run on a
  fresh worker (a broken process pool is replaced);
* ``BackendStartError`` raised from ``start()`` when the runtime cannot come up
  or be reached, with the runtime's own reason.

A cancelled task is never reported (the engine already resolved it, and drops
late reports).

What the engine owns
--------------------
Dependencies, failure propagation to dependents, ``timeout=`` (the engine's
timer calls ``cancel``), ``retries=`` (the engine submits a new spec, its
``attempt`` one higher) and the cancellation of dependents.  An adapter never
retries, times out or re-runs a task on its own; ``TaskSpec.timeout`` and
``attempt`` are there for the runtime's own logs and limits, not to act on.

Results cross threads through the sink, which is safe to call from any thread and
batches wake-ups onto the loop.  A result may be a :class:`RemoteValue`: the data
stays in the runtime, and specs later submitted to the *same* adapter carry that
object in their args so the adapter can pass the runtime's native reference (a
Dask future, a Ray ObjectRef).  The engine fetches it into the driver only when
someone awaits the value.
"""

from __future__ import annotations

import enum
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from .spec import TaskSpec

__all__ = [
    "BackendInfo",
    "Capabilities",
    "Capability",
    "CompletionSink",
    "ExecutionBackend",
    "RemoteValue",
    "UpstreamRef",
]


class Capability(enum.Enum):
    """Optional promises an adapter may make.  Absence must come with a reason."""

    FUNCTIONS = "functions"
    """Runs Python functions (sync and async)."""
    EXECUTABLES = "executables"
    """Runs command lines, capturing stdout, stderr and the exit code."""
    PARALLEL = "parallel"
    """Runs at least two tasks at the same time."""
    REPORTS_RUNNING = "reports_running"
    """Calls ``sink.set_running`` when each task starts on a worker (service
    tasks are up then, rather than when the runtime accepts them)."""
    CANCEL_QUEUED = "cancel_queued"
    """A task cancelled before it started never starts, even when a worker
    frees up the moment after ``cancel()``."""
    CANCEL_RUNNING = "cancel_running"
    """A running *function* really stops when cancelled (not just abandoned)."""
    KILL_EXECUTABLES = "kill_executables"
    """A running executable's process group is killed when cancelled."""
    RESOURCES = "resources"
    """Honours ``resources=`` (cores, memory) and rejects impossible requests."""
    GPUS = "gpus"
    """Can schedule tasks asking for GPUs."""
    SERIALIZES = "serializes"
    """Ships functions to other processes, so unserialisable ones must fail."""
    LARGE_PAYLOADS = "large_payloads"
    """Moves arguments and results of 50 MB and more."""
    PIPELINE = "pipeline"
    """Accepts a function task before its upstreams on the same adapter have
    finished.  Its args then hold an :class:`UpstreamRef` for each, which the
    adapter turns into the runtime's own reference (a Dask future, a Ray
    ObjectRef), so the runtime starts the task when they finish, with no round
    trip through the driver.  The adapter's report for such a task is held back
    until the upstreams' reports are in, so ordering and failure propagation do
    not change.  A task whose upstream the adapter no longer knows (it finished
    before the task arrived) is refused: ``submit`` returns its uid, and the
    engine submits it again with the upstreams' values."""


@dataclass(frozen=True)
class Capabilities:
    """What an adapter supports, and why it lacks the rest."""

    supported: frozenset[Capability]
    reasons: Mapping[Capability, str] = field(default_factory=dict)

    @classmethod
    def of(cls, *supported: Capability, **absent: str) -> Capabilities:
        """``Capabilities.of(FUNCTIONS, cancel_running="threads cannot be killed")``."""
        reasons = {Capability(k): v for k, v in absent.items()}
        return cls(frozenset(supported), reasons)

    def __contains__(self, cap: object) -> bool:
        return cap in self.supported

    def why_not(self, cap: Capability) -> str:
        return self.reasons.get(cap, "the adapter does not declare it")


@dataclass(frozen=True)
class BackendInfo:
    name: str
    runtime: str
    runtime_version: str
    capabilities: Capabilities


class CompletionSink(Protocol):
    """Where an adapter reports outcomes.  Safe to call from any thread."""

    def set_result(self, uid: str, value: Any) -> None: ...

    def set_exception(self, uid: str, exc: BaseException) -> None: ...

    def set_running(self, uid: str) -> None:
        """Optional: the task started on a worker (used for events and traces)."""

    def set_ran(self, uid: str, start: float, end: float, worker: str) -> None:
        """Optional: when the task ran (``time.time()`` seconds, measured where
        it ran) and on which worker, reported before its outcome.  For adapters
        that run several tasks per runtime call: without it, a trace can only
        show the whole call's span for each task in it."""

    def set_backend_state(self, backend: object, state: str, detail: str) -> None:
        """Optional: what ``backend``'s runtime is doing, for events and progress:
        ``state`` is ``queued``, ``running`` or ``ended``, ``detail`` a sentence
        such as "Slurm job 12 is waiting in the queue (Resources)"."""


@runtime_checkable
class ExecutionBackend(Protocol):
    """The five members every adapter implements; see the module docstring."""

    @property
    def info(self) -> BackendInfo: ...

    async def start(self, sink: CompletionSink) -> None: ...

    def submit(self, specs: Sequence[TaskSpec]) -> Collection[str] | None: ...

    def cancel(self, uids: Sequence[str]) -> None: ...

    async def shutdown(self) -> None: ...


class RemoteValue:
    """A result that stays in the runtime until someone asks for it.

    Adapters subclass it, keep their native reference in ``handle`` and implement
    :meth:`fetch`.  ``owner`` is the adapter that made it: only that adapter is
    given it back as an argument.
    """

    __slots__ = ("handle", "owner")

    def __init__(self, owner: ExecutionBackend, handle: Any):
        self.owner = owner
        self.handle = handle

    async def fetch(self) -> Any:  # pragma: no cover - adapters override
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.handle!r}>"


class UpstreamRef:
    """Stands for the result of a task still running on ``owner`` (see
    ``Capability.PIPELINE``); ``uid`` is the upstream spec's uid."""

    __slots__ = ("owner", "uid")

    def __init__(self, owner: ExecutionBackend, uid: str):
        self.owner = owner
        self.uid = uid

    def __repr__(self) -> str:
        return f"<UpstreamRef {self.uid}>"
