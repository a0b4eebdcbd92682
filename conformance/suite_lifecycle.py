"""Mixins for the promises about stopping: cancelling, and shutting down.

Where a promise is about something that must *not* happen (a cancelled
function runs on, a stuck function holds shutdown hostage), the test waits for the event
that proves the good outcome and gives the bad one a stated bound from
:class:`~asyncflow.conformance.base.Bounds`, never a sleep.
"""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path

import psutil
import pytest

from .. import EngineClosedError
from ..engine import WorkflowEngine
from ..protocol import Capability, ExecutionBackend
from . import tasks as t
from .base import Bounds, backend_of, scenario
from .gate import Gate
from .processes import left_behind

C = Capability

__all__ = ["CancelTests", "ShutdownTests", "Tether"]


async def _dies(pid: int, within: float = 30.0) -> bool:
    """Wait (in a thread, on the process's exit) until ``pid`` is gone."""

    def wait() -> bool:
        try:
            proc = psutil.Process(pid)
            proc.wait(timeout=within)
        except psutil.NoSuchProcess:
            return True
        except psutil.TimeoutExpired:
            return False
        return True

    return await asyncio.to_thread(wait)


async def _handed_over() -> None:
    """Return once the engine has given the adapter what became ready so far:
    it hands over one loop turn's tasks in a callback scheduled that turn, and
    this coroutine resumes only after it."""
    await asyncio.sleep(0)


class Tether:
    """The test's end of :func:`~asyncflow.conformance.tasks.hold`: a loopback
    server that learns a task's pid when it connects, and that the task stopped
    when its connection closes (its function returned or unwound, or its process
    died).  Leaving the ``async with`` lets every held task go."""

    def __init__(self) -> None:
        self.address: tuple[str, int] = ("127.0.0.1", 0)
        self.pids: list[int] = []
        self._arrived = asyncio.Event()
        self._closed = asyncio.Event()
        self._writers: list[asyncio.StreamWriter] = []
        self._server: asyncio.base_events.Server | None = None

    async def __aenter__(self) -> Tether:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.address = self._server.sockets[0].getsockname()[:2]
        return self

    async def __aexit__(self, *exc: object) -> None:
        for w in self._writers:
            w.close()
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _handle(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self._writers.append(writer)
        self.pids.append(int((await reader.readline()).decode() or 0))
        self._arrived.set()
        await reader.read()  # until the task's side closes
        self._closed.set()

    async def arrived(self) -> int:
        await self._arrived.wait()
        return self.pids[0]

    async def stopped(self, within: float) -> bool:
        try:
            await asyncio.wait_for(self._closed.wait(), within)
        except TimeoutError:
            return False
        return True


class CancelTests(Bounds):
    @scenario(C.FUNCTIONS)
    async def test_cancel_waiting_task_and_dependents(
        self, flow: WorkflowEngine
    ) -> None:
        async with Gate() as gate:
            wait, inc = flow.function_task(t.gate_wait), flow.function_task(t.inc)
            blocker = wait(gate.address, "block")
            waiting = inc(blocker)
            downstream = inc(waiting)
            assert waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
            assert downstream.cancelled()
            await gate.arrived("block")
            gate.release("block")
            assert await blocker == "go", "the upstream itself is unaffected"

    @scenario(C.FUNCTIONS, C.CANCEL_QUEUED)
    async def test_cancelled_queued_task_never_runs(
        self, flow: WorkflowEngine, tmp_path: Path
    ) -> None:
        """Holders keep every slot busy at the gate, so the task submitted
        behind them waits in the runtime's own queue when it is cancelled.  Its
        marker would show if it ran: after the holders, after a task submitted
        later than it, after shutdown."""
        marker = tmp_path / "ran"
        fill = self.slots_to_fill
        async with Gate() as gate:
            wait = flow.function_task(t.gate_wait)
            holders = [wait(gate.address, "hold", 120) for _ in range(fill)]
            await gate.arrived("hold")
            queued = flow.function_task(t.touch)(str(marker))
            await _handed_over()
            held_all = gate.count("hold") >= fill
            assert queued.cancel()
            gate.open("hold")
            await asyncio.gather(*holders)
            assert await flow.function_task(t.inc)(1) == 2
        await flow.shutdown()
        assert not marker.exists(), "the task cancelled while queued ran anyway" + (
            f" (all {fill} holders ran at once: if the backend has more "
            "slots, raise `slots_to_fill` on the test class)"
            if held_all
            else ""
        )

    @scenario(C.FUNCTIONS)
    async def test_cancel_running_function(self, flow: WorkflowEngine) -> None:
        async with Gate() as gate:
            wait, inc = flow.function_task(t.gate_wait), flow.function_task(t.inc)
            running = wait(gate.address, "run")
            dependent = inc(running)
            await gate.arrived("run")
            assert running.cancel()
            with pytest.raises(asyncio.CancelledError):
                await running
            with pytest.raises(asyncio.CancelledError):
                await dependent

    @scenario(C.FUNCTIONS, C.CANCEL_RUNNING)
    async def test_cancel_running_function_stops_it(self, flow: WorkflowEngine) -> None:
        async with Gate() as gate:
            running = flow.function_task(t.gate_wait)(gate.address, "run")
            (pid,) = await gate.arrived("run")
            running.cancel()
            with pytest.raises(asyncio.CancelledError):
                await running
            if pid != os.getpid():
                assert await _dies(pid), "the worker running it was stopped"

    @scenario(C.FUNCTIONS, C.CANCEL_RUNNING)
    async def test_cancelled_running_function_never_finishes(
        self, flow: WorkflowEngine, tmp_path: Path
    ) -> None:
        """In or out of the driver's process: the function stops (its
        connection to the test closes) before writing its marker."""
        marker = tmp_path / "finished"
        async with Tether() as tether:
            running = flow.function_task(t.hold)(tether.address, str(marker))
            await tether.arrived()
            running.cancel()
            with pytest.raises(asyncio.CancelledError):
                await running
            stopped = await tether.stopped(self.stop_bound)
            assert stopped, f"still running {self.stop_bound}s after its cancel"
            assert not marker.exists(), "the cancelled function ran to its end"

    @scenario(C.EXECUTABLES, C.KILL_EXECUTABLES)
    async def test_cancel_running_executable_kills_it(
        self, flow: WorkflowEngine
    ) -> None:
        async with Gate() as gate:
            running = flow.executable_task(lambda: gate.command("cmd"))()
            (pid,) = await gate.arrived("cmd")
            running.cancel()
            with pytest.raises(asyncio.CancelledError):
                await running
            assert await _dies(pid), "the command's process was killed"


class ShutdownTests(Bounds):
    @scenario(C.FUNCTIONS)
    async def test_shutdown_cancels_idempotent_and_closes(
        self, flow: WorkflowEngine
    ) -> None:
        before = {th.ident for th in threading.enumerate()}
        children = {p.pid for p in psutil.Process().children(recursive=True)}
        async with Gate() as gate:
            wait, inc = flow.function_task(t.gate_wait), flow.function_task(t.inc)
            assert await inc(1) == 2
            running = wait(gate.address, "held")
            waiting = inc(running)
            await gate.arrived("held")
            gate.release("held")
            await flow.shutdown()
            await flow.shutdown()
            assert running.done() and waiting.done()
            with pytest.raises(EngineClosedError):
                inc(1)
        leftover = await asyncio.to_thread(_new_threads_after_join, before)
        assert not leftover, f"threads left after shutdown: {leftover}"
        left = await asyncio.to_thread(
            left_behind, children, self.process_grace, self.helper_processes
        )
        assert not left, "processes left after shutdown:\n" + "\n".join(left)

    @scenario(C.FUNCTIONS)
    async def test_shutdown_twice_through_the_protocol(
        self, flow: WorkflowEngine
    ) -> None:
        """The engine calls an adapter's shutdown() once; the protocol promises
        that a second call (from a ``finally``, a signal handler) is harmless."""
        assert await flow.function_task(t.inc)(1) == 2
        await flow.shutdown()
        backend = backend_of(flow)
        await asyncio.wait_for(backend.shutdown(), self.shutdown_bound)

    @scenario()
    async def test_shutdown_before_start(self, backend: ExecutionBackend) -> None:
        """A backend made and dropped without ever running (a failed set-up, an
        engine that never started) must still shut down, twice, quietly."""
        await asyncio.wait_for(backend.shutdown(), self.shutdown_bound)
        await asyncio.wait_for(backend.shutdown(), self.shutdown_bound)

    @scenario(C.FUNCTIONS)
    async def test_shutdown_returns_while_a_function_is_stuck(
        self, flow: WorkflowEngine, tmp_path: Path
    ) -> None:
        caps = backend_of(flow).info.capabilities
        if C.CANCEL_RUNNING not in caps and C.SERIALIZES not in caps:
            pytest.skip(
                "a function running in the driver's threads cannot be stopped: "
                + caps.why_not(C.CANCEL_RUNNING)
            )
        before = {th.ident for th in threading.enumerate()}
        loop = asyncio.get_running_loop()
        async with Tether() as tether:
            flow.function_task(t.hold)(tether.address, str(tmp_path / "m"), 300)
            await tether.arrived()
            start = loop.time()
            try:
                await asyncio.wait_for(flow.shutdown(), self.shutdown_bound)
            except TimeoutError:
                pytest.fail(f"shutdown() took over {self.shutdown_bound}s")
            took = loop.time() - start
        leftover = await asyncio.to_thread(_new_threads_after_join, before)
        assert not leftover, f"threads left after a {took:.1f}s shutdown: {leftover}"


def _new_threads_after_join(before: set[int | None]) -> list[str]:
    left = []
    for th in threading.enumerate():
        if th.ident in before or th is threading.current_thread():
            continue
        # enumerate() lists threads still starting, which join() refuses.
        started = getattr(th, "_started", None)
        if started is not None:
            started.wait(10)
        th.join(10)
        if th.is_alive() and not th.name.startswith("asyncio_"):
            left.append(th.name)
    return left
