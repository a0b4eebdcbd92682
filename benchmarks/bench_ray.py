"""asyncflow on Ray against the raw Ray API, in the same run on the same Ray.

    python benchmarks/bench_ray.py [--sizes 1000 10000] [--chain 200] [--repeat 3]

Fan-out: N no-op tasks, all results awaited (raw: ``ray.get([f.remote() ...])``).
Chain: each task takes the previous result.  Raw Ray is measured twice: chained
ObjectRefs submitted up front (Ray resolves every hop inside the runtime) and
``ray.get`` per hop (a driver round trip per hop, which is what any DAG engine
that submits work only once it is ready must pay).  Hand-off: a 200 MB result
passed to a second task; the driver's peak RSS over its baseline.  Driver CPU per
task (all threads of this process) is printed too: on a shared machine it is far
steadier than wall-clock throughput.  Each figure is the median of ``--repeat``
runs, raw and asyncflow alternating.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import statistics
import time
from collections.abc import Callable
from typing import Any

import ray

from asyncflow import WorkflowEngine
from asyncflow.adapters.ray import RayExecutionBackend


def noop() -> None:
    return None


def inc(x: int) -> int:
    return x + 1


def make_bytes(n: int) -> bytes:
    return b"x" * n


def nbytes(data: bytes) -> int:
    return len(data)


class _NullSink:
    def set_result(self, uid: str, value: Any) -> None: ...
    def set_exception(self, uid: str, exc: BaseException) -> None: ...
    def set_running(self, uid: str) -> None: ...


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def timed(fn: Callable[[], Any], cpu: list[float] | None = None) -> float:
    start, c = time.perf_counter(), _cpu()
    fn()
    if cpu is not None:
        cpu.append(_cpu() - c)
    return time.perf_counter() - start


async def atimed(coro: Any, cpu: list[float] | None = None) -> float:
    start, c = time.perf_counter(), _cpu()
    await coro
    if cpu is not None:
        cpu.append(_cpu() - c)
    return time.perf_counter() - start


def _vm_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


async def main(sizes: list[int], chain: int, repeat: int) -> None:
    owner = RayExecutionBackend()
    await owner.start(_NullSink())
    try:
        await bench(owner, sizes, chain, repeat)
    finally:
        await owner.shutdown()


Row = tuple[str, float, float, bool]  # label, raw, asyncflow, higher is better


class _Sides:
    """The same work written against raw Ray and against asyncflow on it."""

    def __init__(self, flow: WorkflowEngine, chain: int) -> None:
        self.r_noop = ray.remote(max_retries=0)(noop)
        self.r_inc = ray.remote(max_retries=0)(inc)
        self.a_noop, self.a_inc = flow.function_task(noop), flow.function_task(inc)
        self.a_make = flow.function_task(make_bytes)
        self.a_nbytes = flow.function_task(nbytes)
        self.chain = chain

    def raw_fan(self, n: int) -> None:
        ray.get([self.r_noop.remote() for _ in range(n)])

    def raw_chain_refs(self) -> None:
        ref = self.r_inc.remote(0)
        for _ in range(self.chain - 1):
            ref = self.r_inc.remote(ref)
        assert ray.get(ref) == self.chain

    def raw_chain_get(self) -> None:
        x = 0
        for _ in range(self.chain):
            x = ray.get(self.r_inc.remote(x))
        assert x == self.chain

    async def af_fan(self, n: int) -> None:
        await asyncio.gather(*(self.a_noop() for _ in range(n)))

    async def af_chain(self) -> None:
        x = self.a_inc(0)
        for _ in range(self.chain - 1):
            x = self.a_inc(x)
        assert await x == self.chain


async def bench(
    owner: RayExecutionBackend, sizes: list[int], chain: int, repeat: int
) -> None:
    flow = WorkflowEngine(RayExecutionBackend(address=owner.address))
    sides = _Sides(flow, chain)
    try:
        sides.raw_fan(200)  # warm both paths: workers, function export
        await sides.af_fan(200)
        rows: list[Row] = []
        for n in sizes:
            rows += await _fanout(sides, n, repeat)
        rows += await _chain(sides, repeat)
        grew = await _handoff_growth(sides)
    finally:
        await flow.shutdown()
    _report(rows, repeat, grew)


async def _fanout(sides: _Sides, n: int, repeat: int) -> list[Row]:
    """Throughput and driver CPU per task of ``n`` no-op tasks."""
    raw, af, raw_cpu, af_cpu = [], [], [], []
    for _ in range(repeat):
        raw.append(n / timed(lambda n=n: sides.raw_fan(n), raw_cpu))
        af.append(n / await atimed(sides.af_fan(n), af_cpu))
    return [
        (
            f"fan-out {n:,} (tasks/s)",
            statistics.median(raw),
            statistics.median(af),
            True,
        ),
        (
            f"fan-out {n:,} driver CPU (us/task)",
            statistics.median(raw_cpu) / n * 1e6,
            statistics.median(af_cpu) / n * 1e6,
            False,
        ),
    ]


async def _chain(sides: _Sides, repeat: int) -> list[Row]:
    """ms per hop of a chain, against both ways raw Ray can run one."""
    chain = sides.chain
    refs, gets, af = [], [], []
    for _ in range(repeat):
        refs.append(timed(sides.raw_chain_refs) / chain * 1e3)
        gets.append(timed(sides.raw_chain_get) / chain * 1e3)
        af.append(await atimed(sides.af_chain()) / chain * 1e3)
    raw_refs, raw_get, af_hop = map(statistics.median, (refs, gets, af))
    label = f"chain {chain}, ms/hop"
    return [
        (f"{label} vs ray.get per hop", raw_get, af_hop, False),
        (f"{label} vs chained ObjectRefs", raw_refs, af_hop, False),
    ]


async def _handoff_growth(sides: _Sides) -> float:
    """MB the driver's peak RSS grows by while a 200 MB result passes from one
    task to another: what asyncflow keeps in the driver, ideally nothing."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset peak RSS
    base = _vm_kb("VmRSS")
    size = 200 * 1024 * 1024
    assert await sides.a_nbytes(sides.a_make(size)) == size
    return (_vm_kb("VmHWM") - base) / 1024


def _report(rows: list[Row], repeat: int, grew: float) -> None:
    cpus = ray.cluster_resources().get("CPU", 0)
    print(
        f"ray {ray.__version__}, {cpus:g} CPUs, median of {repeat}; ratio is "
        "asyncflow/raw (throughput: higher is better; latency: lower is better)"
    )
    print(f"{'':46} {'raw':>10} {'asyncflow':>10} {'ratio':>7}")
    for label, raw_v, af_v, _ in rows:
        print(f"{label:46} {raw_v:10.2f} {af_v:10.2f} {af_v / raw_v:7.2f}")
    print(f"200 MB hand-off: driver peak RSS +{grew:.1f} MB over baseline")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--chain", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=3)
    opts = parser.parse_args()
    asyncio.run(main(opts.sizes, opts.chain, opts.repeat))
