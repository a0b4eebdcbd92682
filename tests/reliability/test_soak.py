"""Soak: 100,000 tasks on threads leave the driver's memory and descriptors as
they were; nested submission from blocks does not deadlock."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from asyncflow import ConcurrentExecutionBackend, WorkflowEngine
from asyncflow.conformance import tasks as t

pytestmark = pytest.mark.timeout(600)


SOAK = """
import asyncio, gc, json
from concurrent.futures import ThreadPoolExecutor
import psutil
from asyncflow import ConcurrentExecutionBackend, WorkflowEngine
from asyncflow.conformance import tasks as t

async def main():
    me = psutil.Process()
    backend = ConcurrentExecutionBackend(ThreadPoolExecutor(2))
    async with WorkflowEngine(backend=backend) as flow:
        inc = flow.function_task(t.inc)
        assert await inc(0) == 1  # warm: threads, sink and pools exist
        gc.collect()
        rss, fds = me.memory_info().rss, me.num_fds()
        for _ in range(10):
            batch = [inc(i) for i in range(10_000)]
            assert sum(await asyncio.gather(*batch)) == sum(range(1, 10_001))
            del batch
        gc.collect()
        print(json.dumps({"grown_mb": (me.memory_info().rss - rss) / 2**20,
                          "fds_before": fds, "fds_after": me.num_fds(),
                          "open": len(flow._open), "inflight": len(flow._inflight)}))

asyncio.run(main())
"""


def test_100k_tasks_release_memory_and_descriptors() -> None:
    """In a fresh interpreter, so other tests' runtimes cannot blur the figures."""
    out = subprocess.run(
        [sys.executable, "-c", SOAK], capture_output=True, text=True, timeout=500
    )
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["grown_mb"] < 50, f"RSS grew by {r['grown_mb']:.1f} MB over 100k tasks"
    assert r["fds_after"] <= r["fds_before"], "file descriptors leaked"
    assert r["open"] == 0 and r["inflight"] == 0


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
