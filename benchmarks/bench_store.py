"""What a result store costs: 10,000 no-op tasks on the thread pool without a
store, with an empty one (every task keyed, run and stored) and with a full one
(every task found), as ratios against no store in the same run, and the store's
bytes per result.

    python benchmarks/bench_store.py [--tasks N] [--repeat R]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from typing import Any

from asyncflow import WorkflowEngine
from asyncflow.store import ResultStore


def noop(i: int) -> int:
    return i


async def once(n: int, store: Any) -> float:
    async with WorkflowEngine(store=store) as flow:
        task = flow.function_task(noop)
        await task(-1)  # warm: the pool's threads
        begin = time.perf_counter()
        await asyncio.gather(*(task(i) for i in range(n)))
        return time.perf_counter() - begin


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", type=int, default=10_000)
    ap.add_argument("--repeat", type=int, default=3)
    ns = ap.parse_args()
    runs: dict[str, list[float]] = {"none": [], "empty": [], "full": []}
    per_result = 0.0
    for _ in range(ns.repeat):
        with tempfile.TemporaryDirectory() as tmp:
            runs["none"].append(asyncio.run(once(ns.tasks, None)))
            runs["empty"].append(asyncio.run(once(ns.tasks, tmp)))
            runs["full"].append(asyncio.run(once(ns.tasks, tmp)))
            store = ResultStore(tmp)
            per_result = store.size() / len(store)
    base = statistics.median(runs["none"])
    print(
        f"{ns.tasks} no-op tasks on threads, median of {ns.repeat}, load "
        f"{os.getloadavg()[0]:.1f}"
    )
    for name, secs in runs.items():
        med = statistics.median(secs)
        print(
            f"  store {name:<5} {med * 1e6 / ns.tasks:7.1f} us/task  "
            f"{med / base:5.2f}x no store"
        )
    print(f"  {per_result:.0f} bytes on disk per stored result")


if __name__ == "__main__":
    main()
