"""Soak: 100,000 tasks on threads leave the driver's memory and descriptors as
they were; nested submission from blocks does not deadlock."""

from __future__ import annotations

import asyncio
import gc
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest

from asyncflow import ConcurrentExecutionBackend, WorkflowEngine
from asyncflow.conformance import tasks as t

pytestmark = pytest.mark.timeout(600)


async def test_100k_tasks_release_memory_and_descriptors() -> None:
    me = psutil.Process()
    async with WorkflowEngine(
        backend=ConcurrentExecutionBackend(ThreadPoolExecutor(2))
    ) as flow:
        inc = flow.function_task(t.inc)
        assert await inc(0) == 1  # warm: threads, sink and pools exist
        gc.collect()
        rss, fds = me.memory_info().rss, me.num_fds()
        for _ in range(10):
            batch = [inc(i) for i in range(10_000)]
            assert sum(await asyncio.gather(*batch)) == sum(range(1, 10_001))
            del batch
        gc.collect()
        grown = (me.memory_info().rss - rss) / 2**20
        assert grown < 50, f"RSS grew by {grown:.1f} MB over 100k tasks"
        assert me.num_fds() <= fds, "file descriptors leaked"
        assert not flow._open and not flow._inflight


async def test_nested_blocks_three_levels_do_not_deadlock() -> None:
    async with WorkflowEngine(
        backend=ConcurrentExecutionBackend(ThreadPoolExecutor(2))
    ) as flow:
        inc = flow.function_task(t.inc)

        @flow.block
        async def leaf(i: int) -> int:
            return sum(await asyncio.gather(*[inc(i) for _ in range(10)]))

        @flow.block
        async def middle(i: int) -> int:
            return sum(await asyncio.gather(*[leaf(i) for _ in range(10)]))

        @flow.block
        async def top() -> int:
            return sum(await asyncio.gather(*[middle(i) for i in range(10)]))

        assert await top() == sum(100 * (i + 1) for i in range(10))
