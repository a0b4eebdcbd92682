"""Mixin for ``Capability.PIPELINE``: tasks handed to the runtime early.

An adapter that declares it receives a function task while its upstreams on the
same adapter still run, with :class:`~asyncflow.protocol.UpstreamRef` in its
arguments.  These scenarios hold the adapter to what that must not change:
values, ordering, failure propagation, cancellation and timeouts look exactly as
they do without pipelining.
"""

from __future__ import annotations

import asyncio

import pytest

from .. import DependencyFailureError, TaskState, TaskTimeoutError
from ..engine import WorkflowEngine
from ..protocol import Capability
from . import tasks as t
from .base import Bounds, scenario
from .gate import Gate

C = Capability

__all__ = ["PipelineTests"]

_LIVE = (TaskState.SUBMITTED, TaskState.RUNNING)


class PipelineTests(Bounds):
    @scenario(C.FUNCTIONS, C.PIPELINE)
    async def test_piped_task_waits_for_its_upstream(
        self, flow: WorkflowEngine
    ) -> None:
        async with Gate() as gate:
            wait, pack = flow.function_task(t.gate_wait), flow.function_task(t.pack)
            upstream = wait(gate.address, "up")
            downstream = pack(upstream, key=upstream)
            assert downstream.state in _LIVE, "handed to the runtime at once"
            await gate.arrived("up")
            assert not downstream.done()
            gate.release("up")
            assert await downstream == (("go",), {"key": "go"})
            assert await upstream == "go"

    @scenario(C.FUNCTIONS, C.PIPELINE)
    async def test_piped_task_whose_upstream_already_finished(
        self, flow: WorkflowEngine
    ) -> None:
        """The adapter finished the upstream but the engine has not heard yet:
        a dependent called now is piped to an upstream the adapter may no
        longer know.  It must refuse that spec (return its uid from
        ``submit``) or run it on the finished upstream; either way the
        dependent gets the upstream's value, reported once."""
        inc = flow.function_task(t.inc)
        upstream = inc(1)  # submitted on the next loop turn, so held in time
        ledger = flow.ledger  # type: ignore[attr-defined]
        arrived = ledger.hold(upstream.uid)
        loop = asyncio.get_running_loop()
        assert await loop.run_in_executor(None, arrived.wait, self.task_bound)
        assert upstream.state in _LIVE, "the engine has not heard yet"
        downstream = inc(upstream)
        assert downstream.state in _LIVE, "handed to the runtime at once"
        await asyncio.sleep(0)  # one loop turn: the engine submits it
        ledger.release(upstream.uid)
        try:
            value = await asyncio.wait_for(downstream, self.task_bound)
        except TimeoutError:
            pytest.fail(
                f"the dependent was never reported within {self.task_bound}s: a "
                "spec refused by submit() must have its uid returned"
            )
        assert value == 3
        assert await upstream == 2

    @scenario(C.FUNCTIONS, C.PIPELINE)
    async def test_long_chain_in_one_batch(self, flow: WorkflowEngine) -> None:
        inc = flow.function_task(t.inc)
        x = inc(0)
        for _ in range(199):
            x = inc(x)
        assert await x == 200

    @scenario(C.FUNCTIONS, C.PIPELINE)
    async def test_piped_fan_in_and_nesting(self, flow: WorkflowEngine) -> None:
        inc, total, pack = (
            flow.function_task(t.inc),
            flow.function_task(t.total),
            flow.function_task(t.pack),
        )
        parts = [inc(i) for i in range(20)]
        assert await total(*parts) == sum(range(1, 21))
        a = inc(1)
        assert await pack([a, {"k": (a,)}]) == (([2, {"k": (2,)}],), {})
        b = inc(2)  # a running upstream inside a frozenset, and a set
        assert await pack(frozenset([b]), {b}) == ((frozenset({3}), {3}), {})

    @scenario(C.FUNCTIONS, C.PIPELINE)
    async def test_piped_failure_propagates(self, flow: WorkflowEngine) -> None:
        boom, inc = flow.function_task(t.boom), flow.function_task(t.inc)
        failing = boom("upstream broke")
        middle = inc(failing)
        last = inc(middle)
        with pytest.raises(ValueError, match="upstream broke"):
            await failing
        for fut in (middle, last):
            with pytest.raises(DependencyFailureError) as info:
                await fut
            assert isinstance(info.value.__cause__, ValueError)
            assert failing.uid in str(info.value)

    @scenario(C.FUNCTIONS, C.PIPELINE)
    async def test_piped_task_cancelled_with_its_upstream(
        self, flow: WorkflowEngine
    ) -> None:
        async with Gate() as gate:
            wait, inc = flow.function_task(t.gate_wait), flow.function_task(t.inc)
            upstream = wait(gate.address, "up")
            downstream = inc(upstream)
            await gate.arrived("up")
            upstream.cancel()
            with pytest.raises(asyncio.CancelledError):
                await downstream
            assert downstream.state is TaskState.CANCELLED

    @scenario(C.FUNCTIONS, C.PIPELINE)
    async def test_piped_task_after_an_upstream_timeout(
        self, flow: WorkflowEngine
    ) -> None:
        async with Gate() as gate:
            slow = flow.function_task(timeout=0.5)(t.gate_wait)
            inc = flow.function_task(t.inc)
            upstream = slow(gate.address, "slow")
            downstream = inc(upstream)
            with pytest.raises(TaskTimeoutError):
                await upstream
            with pytest.raises(DependencyFailureError) as info:
                await downstream
            assert isinstance(info.value.__cause__, TaskTimeoutError)

    @scenario(C.FUNCTIONS, C.PIPELINE)
    async def test_piped_task_cancelled_alone(self, flow: WorkflowEngine) -> None:
        async with Gate() as gate:
            wait, inc = flow.function_task(t.gate_wait), flow.function_task(t.inc)
            upstream = wait(gate.address, "up")
            downstream = inc(upstream)
            await gate.arrived("up")
            assert downstream.cancel()
            gate.release("up")
            assert await upstream == "go", "the upstream is unaffected"
            with pytest.raises(asyncio.CancelledError):
                await downstream
