"""One backend's whole benchmark, run in a fresh process by ``asyncflow bench``.

It writes one JSON object per line to stdout: start-up and shutdown times, then
one record per (side, workload, size, repeat).  Start-up and shutdown are timed
separately from the work.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from typing import Any

from ..engine import WorkflowEngine
from ..registry import load_backend
from .raw import make_raw
from .workloads import WORKLOADS, ident, task_count

OPTIONS: dict[str, dict[str, Any]] = {
    "threads": {"max_workers": 2},
    "processes": {"max_workers": 2},
}


def emit(**record: Any) -> None:
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


async def run_asyncflow(
    backend: str, workloads: list[str], sizes: list[int], repeat: int
) -> None:
    t0 = time.perf_counter()
    flow = WorkflowEngine(backend=load_backend(backend, **OPTIONS.get(backend, {})))
    await flow.start()
    emit(kind="startup", side="asyncflow", seconds=time.perf_counter() - t0)
    try:
        for workload in workloads:
            af, _ = WORKLOADS[workload]
            for n in sizes:
                for r in range(repeat):
                    t0 = time.perf_counter()
                    result = await af(flow, n)
                    emit(
                        kind="run",
                        side="asyncflow",
                        workload=workload,
                        size=n,
                        repeat=r,
                        seconds=time.perf_counter() - t0,
                        tasks=task_count(workload, n),
                        result=result,
                    )
    finally:
        t0 = time.perf_counter()
        await flow.shutdown()
        emit(kind="shutdown", side="asyncflow", seconds=time.perf_counter() - t0)


def run_raw(backend: str, workloads: list[str], sizes: list[int], repeat: int) -> None:
    t0 = time.perf_counter()
    raw = make_raw(backend)
    if raw is None:
        emit(kind="note", side="raw", text="no raw baseline for this runtime here")
        return
    raw.gather([raw.submit(ident, 0)])  # first result: the runtime is up
    emit(kind="startup", side="raw", seconds=time.perf_counter() - t0, api=raw.name)
    try:
        for workload in workloads:
            _, fn = WORKLOADS[workload]
            for n in sizes:
                for r in range(repeat):
                    t0 = time.perf_counter()
                    result = fn(raw, n)
                    emit(
                        kind="run",
                        side="raw",
                        workload=workload,
                        size=n,
                        repeat=r,
                        seconds=time.perf_counter() - t0,
                        tasks=task_count(workload, n),
                        result=result,
                    )
    finally:
        t0 = time.perf_counter()
        raw.shutdown()
        emit(kind="shutdown", side="raw", seconds=time.perf_counter() - t0)


def main() -> None:
    spec = json.loads(sys.argv[1])
    backend, workloads, sizes, repeat = (
        spec["backend"],
        spec["workloads"],
        spec["sizes"],
        spec["repeat"],
    )
    emit(kind="meta", pid=os.getpid(), load=os.getloadavg())
    # Raw first, then asyncflow: each starts and stops its own runtime.
    try:
        run_raw(backend, workloads, sizes, repeat)
    except Exception as exc:  # a raw failure must not hide asyncflow's figures
        emit(kind="error", side="raw", text=f"{type(exc).__name__}: {exc}")
    asyncio.run(run_asyncflow(backend, workloads, sizes, repeat))


if __name__ == "__main__":
    main()
