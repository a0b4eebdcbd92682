"""Mixins for the promises every adapter keeps: values, dependencies, failures."""

from __future__ import annotations

import asyncio

import pytest

from .. import DependencyFailureError, TaskState
from ..engine import WorkflowEngine
from ..protocol import Capability
from . import tasks as t
from .base import scenario

C = Capability

__all__ = ["BlockTests", "DependencyTests", "FailureTests", "FunctionTests"]


class FunctionTests:
    @scenario(C.FUNCTIONS)
    async def test_result_args_and_kwargs(self, flow: WorkflowEngine) -> None:
        pack = flow.function_task(t.pack)
        fut = pack(1, "two", three=[3], four={"k": 4})
        assert fut.uid and fut.state in set(TaskState)
        assert await fut == ((1, "two"), {"three": [3], "four": {"k": 4}})
        assert fut.done() and fut.state is TaskState.DONE
        assert fut.result() == ((1, "two"), {"three": [3], "four": {"k": 4}})
        assert fut.exception() is None

    @scenario(C.FUNCTIONS)
    async def test_sync_and_async_functions(self, flow: WorkflowEngine) -> None:
        add, aadd = flow.function_task(t.add), flow.function_task(t.aadd)
        assert await aadd(add(1, 2), 3) == 6

    @scenario(C.FUNCTIONS)
    async def test_lambda_and_closure(self, flow: WorkflowEngine) -> None:
        k = 10
        times_k = flow.function_task(lambda x: x * k)
        assert await times_k(4) == 40

    @scenario(C.FUNCTIONS)
    async def test_gather_wait_as_completed(self, flow: WorkflowEngine) -> None:
        inc = flow.function_task(t.inc)
        futs = [inc(i) for i in range(5)]
        assert await asyncio.gather(*futs) == [1, 2, 3, 4, 5]
        more = [inc(i) for i in range(3)]
        done, pending = await asyncio.wait(more)
        assert done == set(more) and not pending
        got = sorted(
            [await f for f in asyncio.as_completed([inc(i) for i in range(3)])]
        )
        assert got == [1, 2, 3]
        seen: list[int] = []
        last = inc(41)
        last.add_done_callback(lambda f: seen.append(f.result()))
        await last
        await asyncio.sleep(0)  # done callbacks run one loop turn later
        assert seen == [42]


class DependencyTests:
    @scenario(C.FUNCTIONS)
    async def test_chain(self, flow: WorkflowEngine) -> None:
        inc = flow.function_task(t.inc)
        x = inc(0)
        for _ in range(19):
            x = inc(x)
        assert await x == 20

    @scenario(C.FUNCTIONS)
    async def test_diamond(self, flow: WorkflowEngine) -> None:
        inc, add = flow.function_task(t.inc), flow.function_task(t.add)
        top = inc(0)
        assert await add(inc(top), inc(top)) == 4

    @scenario(C.FUNCTIONS)
    async def test_nested_and_repeated_dependencies(self, flow: WorkflowEngine) -> None:
        inc, pack, add = (
            flow.function_task(t.inc),
            flow.function_task(t.pack),
            flow.function_task(t.add),
        )
        a, b = inc(0), inc(1)
        out = await pack(a, [b, (a, {"k": b})], {a, 5}, key={"x": [b]})
        assert out == ((1, [2, (1, {"k": 2})], {1, 5}), {"key": {"x": [2]}})
        assert await add(a, a) == 2

    @scenario(C.FUNCTIONS)
    async def test_fan_out_fan_in_1000(self, flow: WorkflowEngine) -> None:
        inc, total = flow.function_task(t.inc), flow.function_task(t.total)
        leaves = [inc(i) for i in range(1000)]
        assert await total(*leaves) == sum(range(1, 1001))


class FailureTests:
    @scenario(C.FUNCTIONS)
    async def test_exception_type_and_message_preserved(
        self, flow: WorkflowEngine
    ) -> None:
        boom, custom = flow.function_task(t.boom), flow.function_task(t.raise_custom)
        with pytest.raises(ValueError, match="kaput") as info:
            await boom("kaput")
        notes = "\n".join(getattr(info.value, "__notes__", []))
        assert "boom" in notes and "Traceback" in notes, "worker traceback attached"
        with pytest.raises(t.CustomError) as cinfo:
            await custom("mine", 7)
        assert cinfo.value.code == 7

    @scenario(C.FUNCTIONS)
    async def test_failure_propagates_transitively(self, flow: WorkflowEngine) -> None:
        boom, inc = flow.function_task(t.boom), flow.function_task(t.inc)
        root = boom("root cause")
        child = inc(root)
        grandchild = inc(child)
        sibling = inc(1)
        for fut in (child, grandchild):
            with pytest.raises(DependencyFailureError) as info:
                await fut
            assert isinstance(info.value.__cause__, ValueError)
            assert root.uid in str(info.value)
            assert info.value.root == root.uid
        failure = grandchild.exception()
        assert isinstance(failure, DependencyFailureError)
        assert child.uid in failure.upstream
        assert await sibling == 2, "unrelated work goes on"
        late = inc(root)  # depending on an already-failed task fails at once
        with pytest.raises(DependencyFailureError):
            await late

    @scenario(C.FUNCTIONS)
    async def test_recursion_error_comes_back(self, flow: WorkflowEngine) -> None:
        with pytest.raises(RecursionError):
            await flow.function_task(t.recurse)(0)


class BlockTests:
    @scenario(C.FUNCTIONS)
    async def test_blocks_compose_and_are_dependencies(
        self, flow: WorkflowEngine
    ) -> None:
        inc, add = flow.function_task(t.inc), flow.function_task(t.add)

        @flow.block
        async def pipeline(x: int) -> int:
            return await add(inc(x), inc(x))

        first = pipeline(1)
        assert await add(first, pipeline(first)) == 4 + 10
        assert first.state is TaskState.DONE

    @scenario(C.FUNCTIONS)
    async def test_block_failure_propagates(self, flow: WorkflowEngine) -> None:
        boom, inc = flow.function_task(t.boom), flow.function_task(t.inc)

        @flow.block
        async def failing() -> None:
            await boom("in block")

        with pytest.raises(DependencyFailureError) as info:
            await inc(failing())
        assert isinstance(info.value.__cause__, ValueError)
