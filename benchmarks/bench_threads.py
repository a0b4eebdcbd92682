"""Foundation benchmark: asyncflow on threads vs raw ThreadPoolExecutor.

Same run, same machine, median of N repeats: no-op fan-out of 10k and 100k tasks
and a 200-task dependent chain.  Prints ratios against the raw executor.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from concurrent.futures import ThreadPoolExecutor, wait

from asyncflow import ConcurrentExecutionBackend, WorkflowEngine


def noop() -> None:
    return None


def inc(x: int) -> int:
    return x + 1


def raw_fanout(n: int, workers: int) -> float:
    with ThreadPoolExecutor(workers) as ex:
        t0 = time.perf_counter()
        wait([ex.submit(noop) for _ in range(n)])
        return time.perf_counter() - t0


def raw_chain(n: int, workers: int) -> float:
    with ThreadPoolExecutor(workers) as ex:
        t0 = time.perf_counter()
        x = 0
        for _ in range(n):
            x = ex.submit(inc, x).result()
        return (time.perf_counter() - t0) / n


async def af_fanout(n: int, workers: int, observed: bool = False) -> float:
    flow = WorkflowEngine(
        backend=ConcurrentExecutionBackend(ThreadPoolExecutor(workers))
    )
    if observed:
        flow.subscribe(lambda event: None)
    task = flow.function_task(noop)
    await flow.start()
    t0 = time.perf_counter()
    await asyncio.gather(*[task() for _ in range(n)])
    dt = time.perf_counter() - t0
    await flow.shutdown()
    return dt


async def af_chain(n: int, workers: int) -> float:
    flow = WorkflowEngine(
        backend=ConcurrentExecutionBackend(ThreadPoolExecutor(workers))
    )
    task = flow.function_task(inc)
    await flow.start()
    t0 = time.perf_counter()
    x = task(0)
    for _ in range(n - 1):
        x = task(x)
    await x
    dt = (time.perf_counter() - t0) / n
    await flow.shutdown()
    return dt


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", default="10000,100000")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    a = p.parse_args()
    for n in map(int, a.sizes.split(",")):
        raw = statistics.median(raw_fanout(n, a.workers) for _ in range(a.repeat))
        af = statistics.median(
            asyncio.run(af_fanout(n, a.workers)) for _ in range(a.repeat)
        )
        print(
            f"fanout {n:>7}: raw {n / raw:>9.0f}/s  asyncflow {n / af:>9.0f}/s  "
            f"ratio {raw / af:.2f}  ({af / n * 1e6:.1f} us/task)"
        )
    n = 10000
    off = statistics.median(
        asyncio.run(af_fanout(n, a.workers)) for _ in range(a.repeat)
    )
    on = statistics.median(
        asyncio.run(af_fanout(n, a.workers, observed=True)) for _ in range(a.repeat)
    )
    print(
        f"events   {n:>5}: no subscriber {n / off:>8.0f}/s  one subscriber "
        f"{n / on:>8.0f}/s  (subscriber costs {(on - off) / n * 1e6:.1f} us/task)"
    )
    raw = statistics.median(raw_chain(200, a.workers) for _ in range(a.repeat))
    af = statistics.median(
        asyncio.run(af_chain(200, a.workers)) for _ in range(a.repeat)
    )
    print(
        f"chain    200: raw {raw * 1e3:.3f} ms/hop  asyncflow {af * 1e3:.3f} ms/hop  "
        f"ratio {af / raw:.2f}"
    )


if __name__ == "__main__":
    main()
