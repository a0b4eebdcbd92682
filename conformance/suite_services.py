"""Mixin for service tasks: up while they run, stopped at shutdown.

A service's future resolves while the service still runs, so these scenarios
hold the service at the gate (it cannot end by itself) and check what the
engine promises on top of the adapter: the future is done, dependents get the
:class:`~asyncflow.services.Service`, and shutdown leaves no process behind.
``REPORTS_RUNNING`` is the adapter's own promise behind the "up" moment.
"""

from __future__ import annotations

import asyncio

from ..engine import WorkflowEngine
from ..events import EventKind, TaskEvent
from ..protocol import Capability
from ..services import Service
from . import tasks as t
from .base import Bounds, scenario
from .gate import Gate
from .suite_lifecycle import _dies

C = Capability

__all__ = ["ServiceTests"]


class ServiceTests(Bounds):
    @scenario(C.FUNCTIONS, C.REPORTS_RUNNING)
    async def test_start_of_a_task_is_reported(self, flow: WorkflowEngine) -> None:
        started = asyncio.Event()
        wanted: list[str] = []

        def note(ev: TaskEvent) -> None:
            if ev.kind is EventKind.RUNNING and ev.uid in wanted:
                started.set()

        flow.subscribe(note)
        async with Gate() as gate:
            held = flow.function_task(t.gate_wait)(gate.address, "run")
            wanted.append(held.uid)
            await gate.arrived("run")
            try:  # while the task is still held
                await asyncio.wait_for(started.wait(), self.stop_bound)
            except TimeoutError:
                raise AssertionError(
                    f"no set_running for a task running {self.stop_bound}s"
                ) from None
            assert not held.done()
            gate.release("run")
            assert await held == "go"

    @scenario(C.EXECUTABLES, C.KILL_EXECUTABLES)
    async def test_service_is_up_while_it_runs_and_stopped_at_shutdown(
        self, flow: WorkflowEngine
    ) -> None:
        async with Gate() as gate:
            serve = flow.executable_task(service=True)(lambda: gate.command("svc"))
            use = flow.function_task(t.pack)
            service = serve()
            (pid,) = await gate.arrived("svc")
            up = await service
            assert isinstance(up, Service) and up.uid == service.uid
            assert await use(service) == ((up,), {})
            await flow.shutdown()
            assert await _dies(pid), "shutdown stopped the service's command"
