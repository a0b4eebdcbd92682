"""Mixins for the promises every adapter keeps: values, dependencies, failures."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from .. import DependencyFailureError, TaskState, WorkerLostError
from ..engine import WorkflowEngine
from ..protocol import Capability
from . import tasks as t
from .base import Bounds, assert_reported_once, backend_of, scenario
from .gate import Gate

C = Capability

__all__ = ["BlockTests", "DependencyTests", "FailureTests", "FunctionTests"]


class FunctionTests(Bounds):
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

    @scenario(C.FUNCTIONS)
    async def test_each_task_reported_once(self, flow: WorkflowEngine) -> None:
        """Results, exceptions, async functions, chains and (where declared)
        commands: the engine ignores a second report, so only the ledger every
        scenario's sink goes through can tell that the adapter sent one."""
        inc, aadd, boom = (
            flow.function_task(t.inc),
            flow.function_task(t.aadd),
            flow.function_task(t.boom),
        )
        futs = [inc(i) for i in range(10)] + [aadd(i, 1) for i in range(10)]
        futs += [boom(f"b{i}") for i in range(5)] + [inc(inc(inc(0)))]
        if C.EXECUTABLES in backend_of(flow).info.capabilities:
            sh = flow.executable_task(lambda line: line)
            futs += [sh("true"), sh("exit 3")]
        await asyncio.gather(*futs, return_exceptions=True)
        await flow.shutdown()  # drained: every report the adapter makes is in
        assert_reported_once(flow)

    @scenario(C.FUNCTIONS)
    async def test_start_and_submit_never_block_the_loop(
        self, flow: WorkflowEngine
    ) -> None:
        """A ticker measures the loop's longest gap while the engine starts the
        adapter and hands it batches; a blocking call shows up as a long gap."""
        loop, gaps, stop = asyncio.get_running_loop(), [0.0], asyncio.Event()

        async def tick() -> None:
            last = loop.time()
            while not stop.is_set():
                await asyncio.sleep(0.005)
                gaps.append(loop.time() - last - 0.005)
                last = loop.time()

        ticker = asyncio.ensure_future(tick())
        await asyncio.sleep(0)  # the ticker takes its first time before start()
        inc = flow.function_task(t.inc)
        assert await asyncio.gather(*[inc(i) for i in range(100)]) == list(
            range(1, 101)
        )
        assert await inc(inc(inc(0))) == 3
        stop.set()
        await ticker
        assert max(gaps) < self.loop_gap_bound, (
            f"the event loop stood still for {max(gaps):.2f}s "
            f"(bound {self.loop_gap_bound}s)"
        )


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
        # every builtin container, frozenset too, on a result kept remote
        assert await pack(frozenset([inc(1), 7])) == ((frozenset({2, 7}),), {})

    @scenario(C.FUNCTIONS)
    async def test_fan_out_fan_in_1000(self, flow: WorkflowEngine) -> None:
        inc, total = flow.function_task(t.inc), flow.function_task(t.total)
        leaves = [inc(i) for i in range(1000)]
        assert await total(*leaves) == sum(range(1, 1001))


class FailureTests(Bounds):
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

    @scenario(C.FUNCTIONS)
    async def test_dependents_of_a_failure_never_run(
        self, flow: WorkflowEngine, tmp_path: Path
    ) -> None:
        """Piped (handed to the adapter while the upstream runs, where
        ``PIPELINE`` is declared) or not (a timeout is never piped), a dependent
        of a failed task must not run at all, not merely be reported failed."""
        async with Gate() as gate:
            up = flow.function_task(t.fail_at_gate)(gate.address, "up")
            piped = flow.function_task(t.touch)
            plain = flow.function_task(timeout=120)(t.touch)
            child = piped(str(tmp_path / "piped"), up)
            deps = [child, piped(str(tmp_path / "grandchild"), child)]
            deps.append(plain(str(tmp_path / "plain"), up))
            await gate.arrived("up")
            gate.release("up")
            with pytest.raises(ValueError, match="planned failure"):
                await up
            for dep in deps:
                with pytest.raises(DependencyFailureError):
                    await dep
        await flow.shutdown()  # drained: a dependent the adapter ran has written
        ran = sorted(p.name for p in tmp_path.iterdir())
        assert not ran, f"dependents of a failed task ran: {ran}"

    @scenario(C.FUNCTIONS)
    async def test_failure_is_reported_promptly(self, flow: WorkflowEngine) -> None:
        """A task that raises at once is reported about as fast as one that
        returns: within ten no-op round trips, or the floor if that is longer."""
        inc, boom = flow.function_task(t.inc), flow.function_task(t.boom)
        assert await inc(0) == 1  # the runtime is up
        loop, trip = asyncio.get_running_loop(), 0.0
        for i in range(3):
            start = loop.time()
            assert await inc(i) == i + 1
            trip = max(trip, loop.time() - start)
        bound = max(self.failure_report_floor, 10 * trip)
        try:
            with pytest.raises(ValueError, match="prompt"):
                await asyncio.wait_for(boom("prompt"), bound)
        except TimeoutError:
            pytest.fail(
                f"a failure took over {bound:.1f}s to be reported (a no-op round "
                f"trip took {trip:.3f}s)"
            )

    @scenario(C.FUNCTIONS, C.SERIALIZES)
    async def test_killed_worker_is_worker_lost(self, flow: WorkflowEngine) -> None:
        """A function that ends its worker process fails with WorkerLostError,
        and the backend goes on running the next task."""
        if await flow.function_task(t.getpid)() == os.getpid():
            pytest.skip("functions run in the driver process: os._exit would end it")
        with pytest.raises(WorkerLostError):
            await flow.function_task(t.exit_worker)(os.getpid())
        assert await flow.function_task(t.inc)(1) == 2, "the next task runs"


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
