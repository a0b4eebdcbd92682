"""Benchmark: asyncflow's radical.pilot adapter against raw radical.pilot.

Both sides run on the *same* local.localhost pilot (one RadicalRuntime), so they
share the agent, the raptor master and its workers.  Runs alternate raw and
asyncflow in chunks (raw first, then asyncflow first, ...) so that load from
other users of the machine falls on both.  Besides wall-clock throughput, two
CPU figures per task: the driver plus every pilot process (with the task
processes they reaped), and the driver alone.  The pilot's processes burn CPU
while idle, so the first still grows with wall time; the second is what the
adapter and engine add on top of radical.pilot's own client.

Reported: pilot start, one task's round trip, fan-out throughput of no-op
executables (/bin/true) and no-op functions, a chain of dependent executables,
and shutdown.  Ratios are raw time / asyncflow time (1.0: no overhead, higher is
better for asyncflow).

radical.pilot manages 5-30 tasks/s here, so the default sizes are the issue's
(1,000) rather than the other runtimes' 10,000; ``--big`` adds 10k fan-outs.

    .venv/bin/python benchmarks/bench_radical.py [--n 1000] [--rounds 4] [--chain 50]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import time
from collections.abc import Callable
from typing import Any

import psutil
import radical.pilot as rp

from asyncflow import WorkflowEngine
from asyncflow.adapters.radical import RadicalExecutionBackend, RadicalRuntime
from asyncflow.adapters.radical.reaper import working_under


def noop(x: int) -> int:
    return x


# -- raw radical.pilot ---------------------------------------------------------


def raw_wait(rt: RadicalRuntime, tasks: list[Any]) -> None:
    rt.tmgr.wait_tasks([t.uid for t in tasks], state=rp.FINAL)
    bad = [t.uid for t in tasks if t.state != rp.DONE]
    assert not bad, f"raw tasks failed: {bad[:5]}"


def raw_exe(rt: RadicalRuntime, n: int) -> None:
    tds = [rp.TaskDescription({"executable": "/bin/true"}) for _ in range(n)]
    raw_wait(rt, rt.tmgr.submit_tasks(tds))


def raw_fn(rt: RadicalRuntime, n: int) -> None:
    tds = [
        rp.TaskDescription(
            {"mode": rp.TASK_FUNCTION, "function": rp.PythonTask(noop, (i,), {})}
        )
        for i in range(n)
    ]
    tasks = rt.raptor.submit_tasks(tds)
    raw_wait(rt, tasks)
    assert [t.return_value for t in tasks] == list(range(n))


def raw_chain(rt: RadicalRuntime, n: int) -> None:
    for _ in range(n):
        raw_exe(rt, 1)


# -- asyncflow -------------------------------------------------------------------


def af(rt: RadicalRuntime, body: Callable[[WorkflowEngine], Any]) -> None:
    async def main() -> None:
        async with WorkflowEngine(backend=RadicalExecutionBackend(runtime=rt)) as flow:
            await body(flow)

    asyncio.run(main())


def af_exe(rt: RadicalRuntime, n: int) -> None:
    async def body(flow: WorkflowEngine) -> None:
        true = flow.executable_task(lambda: "/bin/true")
        assert await asyncio.gather(*[true() for _ in range(n)]) == [""] * n

    af(rt, body)


def af_fn(rt: RadicalRuntime, n: int) -> None:
    async def body(flow: WorkflowEngine) -> None:
        f = flow.function_task(noop)
        assert await asyncio.gather(*[f(i) for i in range(n)]) == list(range(n))

    af(rt, body)


def af_chain(rt: RadicalRuntime, n: int) -> None:
    async def body(flow: WorkflowEngine) -> None:
        true = flow.executable_task(lambda *_: "/bin/true")
        x = true()
        for _ in range(n - 1):
            x = true(x)
        await x

    af(rt, body)


# -- driver -------------------------------------------------------------------------


def cpu_seconds(rt: RadicalRuntime) -> float:
    """CPU time of the driver and every pilot process, with the children they
    reaped (the tasks): a cost measure the machine's load does not skew."""
    assert rt.base
    pids = {os.getpid(), *rt._extra_pids, *working_under([rt.base], set())}
    total = 0.0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            c = psutil.Process(pid).cpu_times()
            total += c.user + c.system + c.children_user + c.children_system
    return total


def driver_cpu() -> float:
    """CPU time of this process alone: radical.pilot's client threads plus, on
    the asyncflow side, the adapter and the engine.  The pilot's processes poll
    their sockets on a 10 ms timer, so their CPU grows with wall time, and a
    loaded machine skews the total; this share it does not."""
    c = psutil.Process().cpu_times()
    return c.user + c.system


def timed(
    rt: RadicalRuntime, fn: Callable[..., None], n: int
) -> tuple[float, float, float]:
    c0, d0, t0 = cpu_seconds(rt), driver_cpu(), time.perf_counter()
    fn(rt, n)
    wall = time.perf_counter() - t0
    return wall, cpu_seconds(rt) - c0, driver_cpu() - d0


def emit(row: dict[str, Any]) -> None:
    print(json.dumps(row), flush=True)


Runs = dict[str, list[tuple[float, float, float]]]


def compare(
    rt: RadicalRuntime,
    label: str,
    raw: Callable[..., None],
    ours: Callable[..., None],
    n: int,
    rounds: int,
) -> dict[str, Any]:
    """``rounds`` alternating raw/asyncflow runs of ``n`` tasks each."""
    runs: Runs = {"raw": [], "asyncflow": []}
    for i in range(rounds):
        pair = [("raw", raw), ("asyncflow", ours)]
        for name, fn in pair if i % 2 == 0 else pair[::-1]:
            runs[name].append(timed(rt, fn, n))
    row = _row(label, runs, n * rounds)
    emit(row)
    return row


def _row(label: str, runs: Runs, total: int) -> dict[str, Any]:
    """Throughput and CPU per task of each side, summed over its runs, and
    raw / asyncflow ratios."""
    wall, cpu, drv = (_sums(runs, i) for i in range(3))
    return {
        "bench": label,
        "tasks": total,
        "raw_per_s": round(total / wall["raw"], 2),
        "asyncflow_per_s": round(total / wall["asyncflow"], 2),
        "ratio_wall": round(wall["raw"] / wall["asyncflow"], 2),
        "raw_cpu_ms_per_task": round(1000 * cpu["raw"] / total, 1),
        "asyncflow_cpu_ms_per_task": round(1000 * cpu["asyncflow"] / total, 1),
        "ratio_cpu": round(cpu["raw"] / cpu["asyncflow"], 2),
        "raw_driver_cpu_ms_per_task": round(1000 * drv["raw"] / total, 2),
        "asyncflow_driver_cpu_ms_per_task": round(1000 * drv["asyncflow"] / total, 2),
        "runs_s": {k: [round(r[0], 2) for r in v] for k, v in runs.items()},
        "load": round(os.getloadavg()[0], 1),
    }


def _sums(runs: Runs, field: int) -> dict[str, float]:
    """One figure of ``timed``'s (0: wall, 1: all CPU, 2: driver CPU) summed
    per side."""
    return {k: sum(r[field] for r in v) for k, v in runs.items()}


def main() -> None:
    args = _parse()
    t0 = time.perf_counter()
    rt = RadicalRuntime({"resource": "local.localhost"})
    rt.wait_ready()
    emit(
        {
            "bench": "pilot start",
            "s": round(time.perf_counter() - t0, 2),
            "detail": {k: round(v, 2) for k, v in rt.timings.items()},
            "load": round(os.getloadavg()[0], 1),
        }
    )
    try:
        t1 = time.perf_counter()
        raw_fn(rt, 1)  # the raptor workers come up after the pilot
        emit(
            {
                "bench": "first function result after start",
                "s": round(time.perf_counter() - t1, 2),
            }
        )
        _compare_all(rt, args)
    finally:
        t2 = time.perf_counter()
        rt.close()
        emit(
            {
                "bench": "shutdown",
                "s": round(time.perf_counter() - t2, 2),
                "detail": {k: round(v, 2) for k, v in rt.timings.items()},
            }
        )


def _parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1000, help="tasks per fan-out side")
    ap.add_argument(
        "--rounds",
        type=int,
        default=4,
        help="fan-outs run as this many alternating chunks",
    )
    ap.add_argument("--chain", type=int, default=50)
    ap.add_argument("--big", action="store_true", help="also 10,000-task fan-outs")
    return ap.parse_args()


def _compare_all(rt: RadicalRuntime, args: argparse.Namespace) -> None:
    """Round trips first, then fan-outs, then the chain: each on a pilot
    already warmed by the one before."""
    compare(rt, "round trip, executable", raw_exe, af_exe, 1, 6)
    compare(rt, "round trip, function", raw_fn, af_fn, 1, 6)
    per = max(1, args.n // args.rounds)
    compare(rt, "fan-out /bin/true", raw_exe, af_exe, per, args.rounds)
    compare(rt, "fan-out function", raw_fn, af_fn, per, args.rounds)
    if args.big:
        compare(rt, "fan-out /bin/true", raw_exe, af_exe, 10 * args.n, 1)
        compare(rt, "fan-out function", raw_fn, af_fn, 10 * args.n, 1)
    if args.chain:
        compare(rt, "chain of executables", raw_chain, af_chain, args.chain, 2)


if __name__ == "__main__":
    main()
