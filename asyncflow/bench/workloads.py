"""The benchmark workloads, each written once for asyncflow and once for a raw
runtime's own API, so the two sides do exactly the same work.

Task bodies live at module level so every runtime ships them by reference.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Callable
from typing import Any

from ..engine import WorkflowEngine
from .raw import Raw

ARRAY_ITEMS = 131072  # float64: 1 MiB per array
SLEEP = 0.02


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
    time.sleep(SLEEP)
    return i


def run_true() -> int:
    return subprocess.run(["/bin/true"], check=True).returncode


def task_count(workload: str, n: int) -> int:
    return {
        "fanout": n,
        "chain": n,
        "diamond": 4 * max(1, n // 4),
        "mapreduce": min(n, 32) + 1,
        "sleep": min(n, 100),
        "exec": min(n, 200),
    }[workload]


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
    return await r(*[m(i) for i in range(min(n, 32))])


async def af_sleep(flow: WorkflowEngine, n: int) -> Any:
    t = flow.function_task(nap)
    return sum(await asyncio.gather(*[t(i) for i in range(min(n, 100))]))


async def af_exec(flow: WorkflowEngine, n: int) -> Any:
    t = flow.executable_task(lambda: ["/bin/true"])
    out = await asyncio.gather(*[t() for _ in range(min(n, 200))])
    return len(out)


# -- raw side ---------------------------------------------------------------------
def raw_fanout(raw: Raw, n: int) -> Any:
    return sum(raw.gather([raw.submit(ident, i) for i in range(n)]))


def raw_chain(raw: Raw, n: int) -> Any:
    x = raw.submit(inc, 0)
    for _ in range(n - 1):
        x = raw.submit(inc, x)
    return raw.gather([x])[0]


def raw_diamond(raw: Raw, n: int) -> Any:
    bottoms = []
    for i in range(max(1, n // 4)):
        top = raw.submit(ident, i)
        bottoms.append(raw.submit(add, raw.submit(inc, top), raw.submit(inc, top)))
    return sum(raw.gather(bottoms))


def raw_mapreduce(raw: Raw, n: int) -> Any:
    maps = [raw.submit(make_array, i) for i in range(min(n, 32))]
    return raw.gather([raw.submit(array_total, *maps)])[0]


def raw_sleep(raw: Raw, n: int) -> Any:
    return sum(raw.gather([raw.submit(nap, i) for i in range(min(n, 100))]))


def raw_exec(raw: Raw, n: int) -> Any:
    return len(raw.gather([raw.submit(run_true) for _ in range(min(n, 200))]))


WORKLOADS: dict[str, tuple[Callable[..., Any], Callable[..., Any]]] = {
    "fanout": (af_fanout, raw_fanout),
    "chain": (af_chain, raw_chain),
    "diamond": (af_diamond, raw_diamond),
    "mapreduce": (af_mapreduce, raw_mapreduce),
    "sleep": (af_sleep, raw_sleep),
    "exec": (af_exec, raw_exec),
}
