"""Soak: 100,000 tasks on threads and 20,000 on Dask and on Ray leave the
driver's memory and descriptors as they were; nested submission from blocks does
not deadlock."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest

from asyncflow import ConcurrentExecutionBackend, WorkflowEngine
from asyncflow.conformance import tasks as t

from .conftest import require, run_driver

pytestmark = pytest.mark.timeout(600)

Measure = Callable[[str, str, str, float], None]


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
                          "open": len(flow._state.open),
                          "inflight": len(flow._state.inflight)}))

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


@pytest.mark.slow
@pytest.mark.parametrize("name", ["dask", "ray"])
def test_20k_tasks_on_a_runtime_release_memory_and_descriptors(
    name: str, measure: Measure
) -> None:
    """20,000 tasks, in batches of 2,000, on the backend's default runtime (2
    workers), in a fresh interpreter after a 2,000-task warm-up: memory and
    descriptors counted after the first 10,000 tasks do not grow over the
    next 10,000 (a pool the runtime grows once under load is not a leak)."""
    require(name)
    r = run_driver("soak", name, "20000", timeout=540)
    measure(
        "soak: 20,000 tasks",
        name,
        f"RSS {r['grown_mb']:+.1f} MB, fds {r['fds_before']}->{r['fds_after']}",
        r["seconds"],
    )
    assert r["open"] == 0 and r["inflight"] == 0
    assert r["grown_mb"] < 50, f"RSS grew by {r['grown_mb']:.1f} MB over 10k tasks"
    # A leak grows with the 10,000 tasks: one descriptor per batch is five.  A
    # runtime replacing a worker meanwhile opens one connection to the new one.
    assert r["fds_after"] <= r["fds_before"] + 2, (
        f"file descriptors leaked: {r['fds_before']} -> {r['fds_after']}, "
        f"new: {r['fds_new']}"
    )
