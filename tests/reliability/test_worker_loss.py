"""A worker killed from outside while it runs a task.

The task reports its worker's pid to a :class:`Gate` and blocks there; the test
SIGKILLs that pid.  The task must fail with WorkerLostError within a bounded time
(or be re-run when ``retries=`` allows it), its dependents must fail with
DependencyFailureError, the task running on the other worker must finish, new
tasks must run, and no future may hang.

Threads are not here: a thread is not a process that can be killed from outside.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable

import pytest

from asyncflow import DependencyFailureError, WorkerLostError, WorkflowEngine
from asyncflow.conformance import Gate
from asyncflow.conformance import tasks as t

from .conftest import Runtime

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.parametrize(
        "runtime", ["processes", "dask", "ray", "parsl"], indirect=True
    ),
]

#: seconds from the kill to the WorkerLostError (or to the re-run's start)
BOUND = 30.0

Measure = Callable[[str, str, str, float], None]


async def test_killed_worker_fails_its_task_and_the_rest_goes_on(
    runtime: Runtime, measure: Measure
) -> None:
    async with WorkflowEngine(runtime.backend()) as flow, Gate() as gate:
        wait = flow.function_task(t.gate_wait)
        inc = flow.function_task(t.inc)
        victim = wait(gate.address, "victim", 120)
        dependent = inc(victim)
        (pid,) = await asyncio.wait_for(gate.arrived("victim"), 60)
        bystander = wait(gate.address, "bystander", 120)
        (other,) = await asyncio.wait_for(gate.arrived("bystander"), 60)
        assert other != pid, "the two tasks run on different workers"
        start = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(WorkerLostError, match="gate_wait"):
            await asyncio.wait_for(victim, BOUND)
        lost_after = time.monotonic() - start
        measure("worker killed mid-task", runtime.name, "WorkerLostError", lost_after)
        with pytest.raises(DependencyFailureError, match="WorkerLostError"):
            await asyncio.wait_for(dependent, 10)
        gate.release("bystander")
        if runtime.isolates_workers:
            assert await asyncio.wait_for(bystander, 60) == "go"
        else:
            # concurrent.futures: a dead worker breaks the whole pool, so the task
            # running next to it is lost too (retries= re-runs it, see below).
            with pytest.raises(WorkerLostError, match="gate_wait"):
                await asyncio.wait_for(bystander, 60)
        # The workflow goes on: both workers take new work.
        results = await asyncio.wait_for(
            asyncio.gather(*(inc(i) for i in range(20))), 120
        )
        assert results == list(range(1, 21))


async def test_killed_worker_task_is_rerun_with_retries(
    runtime: Runtime, measure: Measure
) -> None:
    async with WorkflowEngine(runtime.backend()) as flow, Gate() as gate:
        wait = flow.function_task(retries=1)(t.gate_wait)
        victim = wait(gate.address, "victim", 120)
        bystander = wait(gate.address, "bystander", 120)
        (pid,) = await asyncio.wait_for(gate.arrived("victim"), 60)
        await asyncio.wait_for(gate.arrived("bystander"), 60)
        start = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        pids = await asyncio.wait_for(gate.arrived("victim", 2), BOUND)
        rerun_after = time.monotonic() - start
        assert pids[1] != pid, "the second attempt runs in a live worker"
        measure(
            "worker killed mid-task, retries=1", runtime.name, "re-run", rerun_after
        )
        gate.release("victim")
        assert await asyncio.wait_for(victim, 60) == "go"
        if not runtime.isolates_workers:  # the broken pool's other task re-runs too
            await asyncio.wait_for(gate.arrived("bystander", 2), BOUND)
        gate.release("bystander")
        assert await asyncio.wait_for(bystander, 60) == "go"
        assert gate.count("bystander") == (1 if runtime.isolates_workers else 2)


async def test_killed_worker_with_cancelled_tasks_queued_behind_it(
    runtime: Runtime,
) -> None:
    """Tasks cancelled while queued do not stop the rest from finishing when a
    worker dies (concurrent.futures before Python 3.12 stopped failing a broken
    pool's futures at the first cancelled one, and the rest hung)."""
    async with WorkflowEngine(runtime.backend()) as flow, Gate() as gate:
        wait = flow.function_task(t.gate_wait)
        inc = flow.function_task(t.inc)
        victim = wait(gate.address, "victim", 120)
        (pid,) = await asyncio.wait_for(gate.arrived("victim"), 60)
        bystander = wait(gate.address, "bystander", 120)
        await asyncio.wait_for(gate.arrived("bystander"), 60)
        queued = [inc(i) for i in range(12)]
        await asyncio.sleep(0)  # one loop turn: they reach the runtime
        cancelled, kept = queued[::2], queued[1::2]
        for f in cancelled:
            f.cancel()
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(WorkerLostError, match="gate_wait"):
            await asyncio.wait_for(victim, BOUND)
        gate.release("bystander")
        _, pending = await asyncio.wait([bystander, *kept], timeout=60)
        assert not pending, f"{len(pending)} futures never finished"
        assert all(f.cancelled() for f in cancelled)
        lost = bystander.exception()  # a broken pool loses it; elsewhere it runs
        assert isinstance(lost, WorkerLostError) or bystander.result() == "go"
        for i, f in zip(range(1, 12, 2), kept, strict=True):
            # A broken pool loses what it held; everything else runs.
            assert isinstance(f.exception(), WorkerLostError) or f.result() == i + 1
