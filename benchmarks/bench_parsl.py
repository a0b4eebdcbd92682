"""Parsl benchmark: asyncflow on ParslExecutionBackend vs raw Parsl ``python_app``.

Both sides share one DataFlowKernel (the same HTEX interchange and workers, or the
same thread pool), and each repeat runs both back to back, alternating which goes
first, so drift on a busy machine hits both alike.  Median of ``--repeat`` runs:

* no-op fan-out of each ``--sizes`` (tasks/s; asyncflow/raw ratio, >= 0.9 wanted)
* a ``--chain``-task dependent chain (ms per hop; asyncflow/raw ratio, <= 1.2
  wanted).  Raw Parsl chains the idiomatic way, passing each AppFuture to the
  next app call so the DFK resolves the dependency.

    python benchmarks/bench_parsl.py                     # HTEX, 1k and 10k, chain 200
    python benchmarks/bench_parsl.py --executor threads  # Parsl's ThreadPoolExecutor
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import wait
from typing import Any

from parsl import python_app
from parsl.config import Config
from parsl.dataflow.dflow import DataFlowKernel
from parsl.executors import HighThroughputExecutor, ThreadPoolExecutor

from asyncflow import WorkflowEngine
from asyncflow.adapters.parsl import (
    ParslExecutionBackend,
    QuietFileLogging,
    local_htex_config,
)


def noop() -> None:
    return None


def inc(x: int) -> int:
    return x + 1


def load(executor: str, run_dir: str, workers: int) -> DataFlowKernel:
    if executor == "htex":
        config = local_htex_config(run_dir, max_workers=workers)
    else:
        config = Config(
            executors=[ThreadPoolExecutor(label="threads", max_threads=workers)],
            run_dir=run_dir,
            initialize_logging=QuietFileLogging(),
        )
    dfk = DataFlowKernel(config)
    for ex in dfk.executors.values():
        if isinstance(ex, HighThroughputExecutor):
            while sum(m["worker_count"] for m in ex.connected_managers()) < workers:
                time.sleep(0.1)
    return dfk


def runtime_pids(dfk: DataFlowKernel) -> list[int]:
    """The driver, the interchange and every process of the HTEX blocks."""
    pids = [os.getpid()]
    for ex in dfk.executors.values():
        if isinstance(ex, HighThroughputExecutor):
            pids.append(ex.interchange_proc.pid)
            jobs = ex.provider.resources.values()
            groups = {os.getpgid(job["remote_pid"]) for job in jobs}
            for entry in os.listdir("/proc"):
                if entry.isdigit():
                    with contextlib.suppress(OSError):
                        if os.getpgid(int(entry)) in groups:
                            pids.append(int(entry))
    return pids


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of these processes (all threads), from /proc."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError), open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def raw_fanout(dfk: DataFlowKernel, label: str, n: int) -> float:
    app = python_app(noop, data_flow_kernel=dfk, executors=[label])
    t0 = time.perf_counter()
    futs = [app() for _ in range(n)]
    wait(futs)
    elapsed = time.perf_counter() - t0
    assert all(f.exception() is None for f in futs)
    return elapsed


def raw_chain(dfk: DataFlowKernel, label: str, n: int) -> float:
    app = python_app(inc, data_flow_kernel=dfk, executors=[label])
    t0 = time.perf_counter()
    x: Any = 0
    for _ in range(n):
        x = app(x)
    assert x.result() == n
    return (time.perf_counter() - t0) / n


def af_fanout(dfk: DataFlowKernel, n: int) -> float:
    async def main() -> float:
        async with WorkflowEngine(ParslExecutionBackend(dfk)) as flow:
            task = flow.function_task(noop)
            t0 = time.perf_counter()
            await asyncio.gather(*(task() for _ in range(n)))
            return time.perf_counter() - t0

    return asyncio.run(main())


def af_chain(dfk: DataFlowKernel, n: int) -> float:
    async def main() -> float:
        async with WorkflowEngine(ParslExecutionBackend(dfk)) as flow:
            task = flow.function_task(inc)
            t0 = time.perf_counter()
            x: Any = 0
            for _ in range(n):
                x = task(x)
            assert await x == n
            return (time.perf_counter() - t0) / n

    return asyncio.run(main())


Runs = tuple[list[float], list[float], list[float], list[float]]


def alternate(
    repeat: int, raw: Callable[[], float], af: Callable[[], float], pids: list[int]
) -> Runs:
    """Run both ``repeat`` times, alternating which goes first: their results,
    then the CPU seconds all runtime processes spent on each run."""
    out: Runs = ([], [], [], [])
    for i in range(repeat):
        for side in [0, 1] if i % 2 == 0 else [1, 0]:
            c0 = cpu_seconds(pids)
            out[side].append((raw, af)[side]())
            out[side + 2].append(cpu_seconds(pids) - c0)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--executor", choices=["htex", "threads"], default="htex")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--chain", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    tmp = tempfile.mkdtemp(prefix="bench-parsl-")
    t0 = time.perf_counter()
    dfk = load(args.executor, f"{tmp}/runinfo", args.workers)
    label = next(lbl for lbl in dfk.executors if lbl != "_parsl_internal")
    print(
        f"parsl {args.executor}: {args.workers} workers up in "
        f"{time.perf_counter() - t0:.1f}s"
    )
    pids = runtime_pids(dfk)
    med = statistics.median
    try:
        raw_fanout(dfk, label, 200)  # warm both paths: imports, pickling caches
        af_fanout(dfk, 200)
        for n in args.sizes:
            raw, af, rcpu, acpu = alternate(
                args.repeat,
                lambda n=n: n / raw_fanout(dfk, label, n),
                lambda n=n: n / af_fanout(dfk, n),
                pids,
            )
            r, a = med(raw), med(af)
            rc, ac = med(rcpu) / n * 1e3, med(acpu) / n * 1e3
            print(
                f"fan-out {n:>6}: raw {r:6.0f} tasks/s  asyncflow {a:6.0f} tasks/s"
                f"  ratio {a / r:.2f} | cpu ms/task raw {rc:.2f} af {ac:.2f} "
                f"ratio {ac / rc:.2f} | runs raw {[round(x) for x in raw]} "
                f"af {[round(x) for x in af]}"
            )
        raw, af, rcpu, acpu = alternate(
            args.repeat,
            lambda: raw_chain(dfk, label, args.chain) * 1e3,
            lambda: af_chain(dfk, args.chain) * 1e3,
            pids,
        )
        r, a = med(raw), med(af)
        rc, ac = med(rcpu) / args.chain * 1e3, med(acpu) / args.chain * 1e3
        print(
            f"chain {args.chain:>8}: raw {r:6.2f} ms/hop   asyncflow {a:6.2f} ms/hop"
            f"  ratio {a / r:.2f} | cpu ms/hop raw {rc:.2f} af {ac:.2f} "
            f"| runs raw {[round(x, 2) for x in raw]} af {[round(x, 2) for x in af]}"
        )
    finally:
        dfk.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
