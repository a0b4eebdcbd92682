"""The benchmark workloads, each written once for asyncflow and once for a raw
runtime's own API, so the two sides do exactly the same work.

Task bodies live at module level so every runtime ships them by reference, and
import what they need inside the body so a runtime that ships them by value
(raw radical.pilot, see :mod:`.rawrp`) can run them too.  :func:`expected` gives
each workload's answer from first principles: the cross-check compares every
run, on both sides and every backend, with it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from ..engine import WorkflowEngine
from .raw import Raw

ARRAY_ITEMS = 131072  # float64: 1 MiB per array
SLEEP = 0.02
#: fixed task counts: these workloads measure something other than volume
MAPS, NAPS, EXECS = 32, 100, 200
#: each workload runs once at this size, untimed, before it is measured, so
#: that imports and first-call costs (numpy, function shipping) are not timed
#: (not with --quick: a smoke test, whose figures are not for comparing)
WARMUP = 4


def ident(x: int) -> int:
    return x


def inc(x: int) -> int:
    return x + 1


def add(a: int, b: int) -> int:
    return a + b


def make_array(i: int) -> Any:
    import numpy as np

    return np.full(ARRAY_ITEMS, float(i))


def array_total(*arrays: Any) -> float:
    return float(sum(a.sum() for a in arrays))


def nap(i: int) -> int:
    import time

    time.sleep(SLEEP)
    return i


def run_true() -> str:
    """Raw runtimes' executable: like an executable task, it returns the
    command's output, so both sides capture stdout and stderr."""
    import subprocess

    return subprocess.run(
        ["/bin/true"], capture_output=True, text=True, check=True
    ).stdout


def task_count(workload: str, n: int) -> int:
    return {
        "fanout": n,
        "chain": n,
        "diamond": 4 * max(1, n // 4),
        "mapreduce": min(n, MAPS) + 1,
        "sleep": min(n, NAPS),
        "exec": min(n, EXECS),
    }[workload]


def expected(workload: str, n: int) -> Any:
    """The answer every backend must give, worked out without running tasks."""
    if workload == "fanout":
        return n * (n - 1) // 2
    if workload == "chain":
        return n
    if workload == "diamond":
        k = max(1, n // 4)
        return k * (k - 1) + 2 * k  # sum of (i + 1) + (i + 1)
    if workload == "mapreduce":
        m = min(n, MAPS)
        return float(ARRAY_ITEMS * m * (m - 1) // 2)
    if workload == "sleep":
        m = min(n, NAPS)
        return m * (m - 1) // 2
    if workload == "exec":
        return min(n, EXECS)
    raise KeyError(workload)


# -- asyncflow side -------------------------------------------------------------
async def af_fanout(flow: WorkflowEngine, n: int) -> Any:
    t = flow.function_task(ident)
    return sum(await asyncio.gather(*[t(i) for i in range(n)]))


async def af_chain(flow: WorkflowEngine, n: int) -> Any:
    t = flow.function_task(inc)
    x = t(0)
    for _ in range(n - 1):
        x = t(x)
    return await x


async def af_diamond(flow: WorkflowEngine, n: int) -> Any:
    i_, n_, a_ = (
        flow.function_task(ident),
        flow.function_task(inc),
        flow.function_task(add),
    )
    bottoms = []
    for i in range(max(1, n // 4)):
        top = i_(i)
        bottoms.append(a_(n_(top), n_(top)))
    return sum(await asyncio.gather(*bottoms))


async def af_mapreduce(flow: WorkflowEngine, n: int) -> Any:
    m, r = flow.function_task(make_array), flow.function_task(array_total)
    return await r(*[m(i) for i in range(min(n, MAPS))])


async def af_sleep(flow: WorkflowEngine, n: int) -> Any:
    t = flow.function_task(nap)
    return sum(await asyncio.gather(*[t(i) for i in range(min(n, NAPS))]))


async def af_exec(flow: WorkflowEngine, n: int) -> Any:
    t = flow.executable_task(lambda: ["/bin/true"])
    out = await asyncio.gather(*[t() for _ in range(min(n, EXECS))])
    return len(out)


# -- raw side ---------------------------------------------------------------------
# Independent tasks go through ``raw.map`` (one bulk submission where the runtime
# has one); a dependent task gets its upstream handles as arguments, which the
# runtime resolves itself or the driver waits for (see :mod:`.raw`).
def raw_fanout(raw: Raw, n: int) -> Any:
    return sum(raw.gather(raw.map(ident, [(i,) for i in range(n)])))


def raw_chain(raw: Raw, n: int) -> Any:
    x = raw.submit(inc, 0)
    for _ in range(n - 1):
        x = raw.submit(inc, x)
    return raw.gather([x])[0]


def raw_diamond(raw: Raw, n: int) -> Any:
    tops = raw.map(ident, [(i,) for i in range(max(1, n // 4))])
    lefts = raw.map(inc, [(t,) for t in tops])
    rights = raw.map(inc, [(t,) for t in tops])
    return sum(raw.gather(raw.map(add, list(zip(lefts, rights, strict=True)))))


def raw_mapreduce(raw: Raw, n: int) -> Any:
    maps = raw.map(make_array, [(i,) for i in range(min(n, MAPS))])
    return raw.gather([raw.submit(array_total, *maps)])[0]


def raw_sleep(raw: Raw, n: int) -> Any:
    return sum(raw.gather(raw.map(nap, [(i,) for i in range(min(n, NAPS))])))


def raw_exec(raw: Raw, n: int) -> Any:
    return len(raw.gather(raw.executables(["/bin/true"], min(n, EXECS), run_true)))


WORKLOADS: dict[str, tuple[Callable[..., Any], Callable[..., Any]]] = {
    "fanout": (af_fanout, raw_fanout),
    "chain": (af_chain, raw_chain),
    "diamond": (af_diamond, raw_diamond),
    "mapreduce": (af_mapreduce, raw_mapreduce),
    "sleep": (af_sleep, raw_sleep),
    "exec": (af_exec, raw_exec),
}

#: per-backend caps on a workload's size: (full run, --quick); "*": the rest
CAPS: dict[str, dict[str, tuple[int, int]]] = {
    "radical": {
        "*": (300, 12),
        "chain": (50, 6),
        "diamond": (200, 12),
        "mapreduce": (8, 3),
    },
}
#: why; a (backend, workload) entry overrides the backend's
WHY: dict[str | tuple[str, str], str] = {
    "radical": "radical.pilot runs about 10 tasks/s on local.localhost and a "
    "dependent hop takes about 0.25 s",
    ("radical", "mapreduce"): "the adapter declares no large_payloads: each "
    "1 MiB array travels inside radical.pilot task messages",
}


def sizes_for(
    backend: str, workload: str, sizes: list[int], quick: bool
) -> tuple[list[int], str | None]:
    """The sizes ``backend`` runs ``workload`` at, and why if any were capped.

    A size above the cap runs at the cap instead (once, however many sizes were
    above it), so every backend reports every workload; where that leaves one
    size of several, a tenth of the cap joins it, so cost growth still shows.
    Sizes that come to the same task count (the fixed-count workloads) run once,
    at the smallest."""
    why = None
    caps = CAPS.get(backend, {})
    pair = caps.get(workload) or caps.get("*")
    if pair:
        cap = pair[1 if quick else 0]
        if any(task_count(workload, n) > task_count(workload, cap) for n in sizes):
            why = WHY.get((backend, workload)) or WHY.get(backend, "")
            counts = {task_count(workload, n) for n in sizes}
            if len(counts) > 1 and all(n >= cap for n in sizes):
                sizes = [*sizes, max(1, cap // 10)]
        sizes = [min(n, cap) for n in sizes]
    out: dict[int, int] = {}
    for n in sorted(sizes):
        out.setdefault(task_count(workload, n), n)
    return sorted(out.values()), why
