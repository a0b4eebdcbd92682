"""One backend's whole benchmark, run in a fresh process by ``asyncflow bench``.

A fresh process per backend, so that one runtime's threads, imports and leftover
processes cannot slow the next.  It writes one JSON object per line to stdout:
start-up and shutdown times (timed apart from the work, each up to a first
no-op result or down to a closed runtime), one record per (side, workload,
size, repeat) with the machine's load at that moment, and notes, skips and
errors.  A failing workload is reported and the next one runs, so that one
broken case does not hide every other figure; the parent fails the run for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import cProfile
import json
import math
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

from ..engine import WorkflowEngine
from ..registry import load_backend
from .raw import make_raw
from .workloads import WARMUP, WORKLOADS, ident

OPTIONS: dict[str, dict[str, Any]] = {
    "threads": {"max_workers": 2},
    "processes": {"max_workers": 2},
    "radical": {"resources": {"resource": "local.localhost"}},
}


def emit(**record: Any) -> None:
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


def _error(side: str, what: str, exc: BaseException) -> None:
    tail = "".join(traceback.format_exception(exc)[-3:]).strip()
    emit(kind="error", side=side, text=f"{what}: {type(exc).__name__}: {exc}\n{tail}")


class Plan:
    """What this backend runs: workloads, their (possibly capped) sizes, repeats."""

    def __init__(self, spec: dict[str, Any]):
        self.backend: str = spec["backend"]
        self.repeat: int = spec["repeat"]
        self.quick: bool = spec.get("quick", False)
        self.profile: str | None = spec.get("profile")  # a directory
        self.hpc: dict[str, Any] | None = spec.get("hpc")  # the page's allocation
        self.cases: list[tuple[str, int]] = []
        for workload in spec["workloads"]:
            sizes, _ = WORKLOADS[workload].sizes_for(
                self.backend, spec["sizes"], self.quick
            )
            self.cases += [(workload, n) for n in sizes]


#: A timed sample lasts at least this long.  A shorter run is repeated back to
#: back within one sample, as timeit's autorange does, so that costs paid less
#: often than once per short run (a full garbage collection, a runtime's
#: periodic work) weigh the same at every size instead of only at the largest.
MIN_SAMPLE = 0.2
MAX_LOOPS = 20


def measure(
    side: str,
    plan: Plan,
    run: Callable[[str, int], Any],
    skip: Callable[[str], str | None] = lambda _: None,
) -> None:
    """Warm each workload up once, untimed (not with ``--quick``), then time
    every size and repeat."""
    warmed: set[str] = set()
    for workload, n in plan.cases:
        why = skip(workload)
        if why:
            if workload not in warmed:
                emit(kind="skip", side=side, workload=workload, text=why)
            warmed.add(workload)
            continue
        try:
            if workload not in warmed:
                warmed.add(workload)
                if not plan.quick:
                    run(workload, WARMUP)
            loops = 1
            for r in range(plan.repeat):
                sample = _sample(run, workload, n, loops)
                if r == 0 and not plan.quick and sample["seconds"] < MIN_SAMPLE:
                    # a short run: its first sample only sizes the loop
                    short = max(sample["seconds"], 1e-6)
                    loops = min(MAX_LOOPS, math.ceil(MIN_SAMPLE / short))
                    sample = _sample(run, workload, n, loops)
                emit(kind="run", side=side, workload=workload, size=n, repeat=r,
                     tasks=WORKLOADS[workload].tasks(n), **sample)  # fmt: skip
        except Exception as exc:
            _error(side, f"{workload} size {n}", exc)


def _sample(
    run: Callable[[str, int], Any], workload: str, n: int, loops: int
) -> dict[str, Any]:
    """``loops`` runs back to back, timed as one; per run: seconds, and the CPU
    time of every thread of this driver process (what the front end costs, and
    less skewed by other users' load than seconds)."""
    c0, t0 = time.process_time(), time.perf_counter()
    for _ in range(loops):
        result = run(workload, n)
    return {
        "seconds": (time.perf_counter() - t0) / loops,
        "cpu_s": (time.process_time() - c0) / loops,
        "loops": loops,
        "result": result,
        "load": os.getloadavg()[0],
    }


@contextlib.contextmanager
def profiled(plan: Plan, side: str) -> Iterator[None]:
    """With ``--profile``: cProfile the driver's thread (the event loop's, for
    asyncflow), where any overhead asyncflow adds is spent."""
    if not plan.profile:
        yield
        return
    prof = cProfile.Profile()
    prof.enable()
    try:
        yield
    finally:
        prof.disable()
        path = os.path.join(plan.profile, f"profile-{plan.backend}-{side}.pstats")
        prof.dump_stats(path)
        emit(kind="note", side=side, text=f"profile written to {path}")


async def run_asyncflow(plan: Plan) -> None:
    backend = plan.backend
    t0 = time.perf_counter()
    if plan.hpc is not None:
        made = load_backend(backend, plan.hpc)
    else:
        made = load_backend(backend, **OPTIONS.get(backend, {}))
    flow = WorkflowEngine(backend=made)
    try:
        await flow.start()
        await flow.function_task(ident)(0)  # first result: the runtime is up
        if plan.hpc is not None:
            await all_joined(made, plan)
        emit(kind="startup", side="asyncflow", seconds=time.perf_counter() - t0)
        loop = asyncio.get_running_loop()

        def run(workload: str, n: int) -> Any:
            fut = asyncio.run_coroutine_threadsafe(
                WORKLOADS[workload].asyncflow(flow, n), loop
            )
            return fut.result()

        # the timing loop is shared with the raw side, which is synchronous
        with profiled(plan, "asyncflow"):
            await asyncio.to_thread(measure, "asyncflow", plan, run)
    finally:
        t0 = time.perf_counter()
        await flow.shutdown()
        emit(kind="shutdown", side="asyncflow", seconds=time.perf_counter() - t0)


async def all_joined(made: Any, plan: Plan) -> None:
    """``--hpc``: wait until every worker of the allocation has joined, as the
    raw side does before its first result (``wait_for_workers``), so that
    neither side is timed on part of its workers.  The first result may come
    from the first worker of several jobs (Dask) or nodes (Parsl)."""
    from .rawslurm import JOIN_TIMEOUT, expected_workers, parsl_managers

    assert plan.hpc is not None
    want = await asyncio.to_thread(expected_workers, plan.backend, plan.hpc)
    if not want:
        return

    async def count() -> int:
        if plan.backend == "dask":
            info = await made.client.scheduler.identity()
            return len(info.get("workers", {}))
        return await asyncio.to_thread(parsl_managers, made.dfk)

    t0 = time.perf_counter()
    first = have = await count()
    while have < want:
        if time.perf_counter() - t0 > JOIN_TIMEOUT:
            raise TimeoutError(f"{have} of {want} workers joined")
        await asyncio.sleep(0.1)
        have = await count()
    if first < want:
        emit(
            kind="note",
            side="asyncflow",
            text=f"{first} of {want} workers had joined at the first result; "
            f"timing started after all had, {time.perf_counter() - t0:.2f} s later",
        )


def run_raw(plan: Plan) -> None:
    t0 = time.perf_counter()
    raw = make_raw(plan.backend, plan.hpc)
    if raw is None:
        emit(kind="note", side="raw", text="no raw baseline for this runtime here")
        return
    try:
        raw.gather([raw.submit(ident, 0)])  # first result: the runtime is up
        emit(kind="startup", side="raw", seconds=time.perf_counter() - t0, api=raw.name)
        with profiled(plan, "raw"):
            measure("raw", plan, lambda w, n: WORKLOADS[w].raw(raw, n), raw.skip)
    finally:
        t0 = time.perf_counter()
        raw.shutdown()
        emit(kind="shutdown", side="raw", seconds=time.perf_counter() - t0)
        for text in getattr(raw, "notes", ()):
            emit(kind="note", side="raw", text=text)


def _terminate(signum: int, frame: Any) -> None:
    raise SystemExit(f"asyncflow bench: signal {signum}")  # unwinds, closes runtimes


def main() -> None:
    plan = Plan(json.loads(sys.argv[1]))
    signal.signal(signal.SIGTERM, _terminate)
    emit(kind="meta", pid=os.getpid(), load=os.getloadavg())
    # Raw first, then asyncflow: each starts and stops its own runtime.
    try:
        run_raw(plan)
    except Exception as exc:  # a raw failure must not hide asyncflow's figures
        _error("raw", "runtime", exc)
    try:
        asyncio.run(run_asyncflow(plan))
    except Exception as exc:
        _error("asyncflow", "runtime", exc)


if __name__ == "__main__":
    main()
