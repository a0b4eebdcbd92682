"""The fixtures class adapter authors subclass, and the scenario runner.

Every conformance test is an ``async def`` scenario that receives a fresh
:class:`~asyncflow.WorkflowEngine` on the adapter's backend.  :func:`scenario`
turns it into an ordinary synchronous pytest test that runs it in a new event loop
and always shuts the engine down, so the suite needs no asyncio plugin and does
not collide with one the adapter's project already uses.

Every scenario's engine hands the adapter a :class:`ReportLedger` instead of its
own sink: it passes everything on and notes each report, and the scenario fails
if any task was reported twice (the protocol's "exactly once"), whatever the
scenario itself was about.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from ..engine import WorkflowEngine
from ..protocol import Capability, CompletionSink, ExecutionBackend

__all__ = [
    "BackendFixtures",
    "Bounds",
    "ReportLedger",
    "assert_reported_once",
    "backend_of",
    "scenario",
]

USER_PROPERTY = "asyncflow_backend"


class Bounds:
    """How long the suite lets an adapter take where time is the promise, how
    many tasks keep every worker busy, and which processes are not leaks.

    Generous for a loaded CI machine; a slow runtime's test class may raise them
    (and the suite's own strength test lowers them to stay fast)."""

    #: seconds a no-op task may take from its call to its report, the runtime's
    #: start included, where a scenario must wait for one outside the engine
    task_bound: float = 120.0
    #: seconds a task that raises at once may take to be reported, at least;
    #: the bound is ten no-op round trips on the same backend when that is longer
    failure_report_floor: float = 5.0
    #: seconds ``shutdown()`` may take while a function is stuck in a long sleep,
    #: and a second ``shutdown()`` at all
    shutdown_bound: float = 30.0
    #: seconds from cancelling a running function (``CANCEL_RUNNING``) until it
    #: has stopped
    stop_bound: float = 20.0
    #: the longest the event loop may go without a turn while the engine calls
    #: ``start()`` and ``submit()``
    loop_gap_bound: float = 1.0
    #: tasks that hold every slot so that one more must wait in the runtime's
    #: queue: more than the backend under test runs at once
    slots_to_fill: int = 64
    #: seconds the processes an adapter started have to exit once
    #: ``shutdown()`` returned
    process_grace: float = 15.0
    #: command-line fragments of helper processes your runtime's library starts
    #: once per interpreter and keeps until exit, which the leak check must not
    #: count (see :mod:`asyncflow.conformance.processes`)
    helper_processes: tuple[str, ...] = ()


class ReportLedger:
    """The engine's sink, wrapped: notes every report so that a second one for
    the same uid (result after result, exception after result, ...) is caught.

    A piped spec ``submit`` refused is sent again under the same uid, so its one
    report comes from that second submission.

    :meth:`hold` keeps one task's report from the engine until released, so a
    scenario can act while the adapter has finished a task the engine still
    believes running."""

    def __init__(self, sink: CompletionSink):
        self._sink = sink
        self._lock = threading.Lock()
        self._first: dict[str, str] = {}
        self.doubles: list[str] = []
        self._held: dict[str, tuple[threading.Event, list[tuple[bool, Any]]]] = {}

    def hold(self, uid: str) -> threading.Event:
        """Keep ``uid``'s report back; the event is set once it arrived."""
        arrived = threading.Event()
        self._held[uid] = (arrived, [])
        return arrived

    def release(self, uid: str) -> None:
        """Pass on ``uid``'s held report."""
        _, box = self._held.pop(uid)
        for ok, value in box:
            if ok:
                self._sink.set_result(uid, value)
            else:
                self._sink.set_exception(uid, value)

    def _kept(self, uid: str, ok: bool, value: Any) -> bool:
        held = self._held.get(uid)
        if held is None:
            return False
        held[1].append((ok, value))
        held[0].set()
        return True

    def _note(self, uid: str, what: str) -> None:
        with self._lock:
            first = self._first.get(uid)
            if first is None:
                self._first[uid] = what
            else:
                self.doubles.append(f"{uid}: {what} after {first}")

    def set_result(self, uid: str, value: Any) -> None:
        self._note(uid, f"result {type(value).__name__}")
        if not self._kept(uid, True, value):
            self._sink.set_result(uid, value)

    def set_exception(self, uid: str, exc: BaseException) -> None:
        self._note(uid, f"exception {type(exc).__name__}")
        if not self._kept(uid, False, exc):
            self._sink.set_exception(uid, exc)

    def set_ran(self, uid: str, start: float, end: float, worker: str) -> None:
        set_ran = getattr(self._sink, "set_ran", None)
        if set_ran is not None:
            set_ran(uid, start, end, worker)

    def set_running(self, uid: str) -> None:
        self._sink.set_running(uid)

    def set_backend_state(self, backend: object, state: str, detail: str) -> None:
        self._sink.set_backend_state(backend, state, detail)


class _CheckedEngine(WorkflowEngine):
    """A WorkflowEngine whose backends report through a :class:`ReportLedger`."""

    ledger: ReportLedger | None = None

    def _bind(self, loop: asyncio.AbstractEventLoop) -> None:
        super()._bind(loop)
        # The backends' start() tasks were only created: they read the sink later.
        if self.ledger is None and self._sink is not None:
            self.ledger = ReportLedger(self._sink)
            self._sink = self.ledger  # type: ignore[assignment]


def assert_reported_once(flow: WorkflowEngine) -> None:
    """Fail if the adapter reported any task more than once."""
    ledger = getattr(flow, "ledger", None)
    doubles = ledger.doubles if ledger is not None else []
    assert not doubles, "reported more than once: " + "; ".join(doubles[:5])


def backend_of(flow: WorkflowEngine) -> ExecutionBackend:
    """The adapter under test (a scenario's engine has exactly one)."""
    (backend,) = flow.backends.values()
    return backend


class BackendFixtures(Bounds):
    """Override :meth:`backend` to return a *new* backend object per test.

    It may attach to a runtime your own session-scoped fixture started; the
    engine shuts the backend down after each test, so an attached backend must
    leave that runtime running.
    """

    #: seconds one scenario may take before it fails (a hang becomes a failure)
    scenario_timeout: float = 120.0

    @pytest.fixture
    def backend(self) -> ExecutionBackend:
        raise pytest.UsageError(
            f"{type(self).__name__} must override the `backend` fixture to return "
            "the adapter under test (see asyncflow.conformance)"
        )


Scenario = Callable[..., Coroutine[Any, Any, None]]


async def _run(
    fn: Scenario,
    fixtures: BackendFixtures,
    backend: ExecutionBackend,
    bare: bool,
    limit: float,
    kwargs: dict[str, Any],
) -> None:
    """One scenario on a fresh engine (or on the bare backend), which is always
    shut down, and whose adapter must have reported each task once."""
    if bare:
        await asyncio.wait_for(fn(fixtures, backend, **kwargs), limit)
        return
    flow = _CheckedEngine(backend=backend)
    try:
        await asyncio.wait_for(fn(fixtures, flow, **kwargs), limit)
    finally:
        await asyncio.wait_for(flow.shutdown(), 60)
    assert_reported_once(flow)


def scenario(
    *requires: Capability, timeout: float | None = None
) -> Callable[[Scenario], Callable[..., None]]:
    """Make ``async def test_x(self, flow, ...)`` a test needing ``requires``.

    A scenario about the adapter alone, outside any engine, takes ``backend``
    in place of ``flow``."""

    def decorate(fn: Scenario) -> Callable[..., None]:
        params = list(inspect.signature(fn).parameters.values())
        first = [p.name for p in params[:2]]
        assert first in (["self", "flow"], ["self", "backend"]), fn
        bare = first[1] == "backend"  # the adapter alone, with no engine
        extra = params[2:]

        def test(
            self: BackendFixtures,
            backend: ExecutionBackend,
            request: pytest.FixtureRequest,
            **kwargs: Any,
        ) -> None:
            info = backend.info
            request.node.user_properties.append(
                (USER_PROPERTY, f"{info.name} ({info.runtime} {info.runtime_version})")
            )
            missing = [cap for cap in requires if cap not in info.capabilities]
            if missing:
                # the backend is the suite's to shut down, run or not (a fixture
                # may have attached it to a runtime already)
                asyncio.run(backend.shutdown())
                pytest.skip(
                    f"capability {missing[0].value!r} not declared by "
                    f"{info.name}: {info.capabilities.why_not(missing[0])}"
                )
            limit = timeout or self.scenario_timeout
            asyncio.run(_run(fn, self, backend, bare, limit, kwargs))

        test.__name__ = fn.__name__
        test.__qualname__ = fn.__qualname__
        test.__doc__ = fn.__doc__
        test.__module__ = fn.__module__
        base = [
            inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD),
            inspect.Parameter("backend", inspect.Parameter.KEYWORD_ONLY),
            inspect.Parameter("request", inspect.Parameter.KEYWORD_ONLY),
        ]
        test.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
            base + [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in extra]
        )
        test.asyncflow_scenario = True  # type: ignore[attr-defined]
        return test

    return decorate
