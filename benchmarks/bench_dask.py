"""Dask benchmark: asyncflow on Dask vs raw ``distributed`` in the same run.

One cluster serves both sides, so the ratios measure asyncflow's overhead and
nothing else: a ``dask scheduler`` and two single-thread ``dask worker``
processes on loopback, started here.  (A scheduler in the driver process, as in
LocalCluster, would make the two sides differ: the raw sync client shares the
scheduler's thread, an asyncio client on another thread fights it for the GIL.)
The raw side is the usual synchronous ``Client``; repeats alternate between the
two sides so that load drifting on a shared machine hits both.  Median of N:

* no-op fan-out of 1,000 and 10,000 tasks, results gathered into the driver
  (raw: ``client.submit(..., pure=False)`` then ``client.gather``), with the CPU
  time of driver plus cluster per task as a second, steadier measure;
* a 200-task dependent chain, each hop submitted when the previous one finished,
  with the upstream future as the argument (asyncflow's engine submits a task
  when it becomes ready, so this is the like-for-like raw pattern).  The raw
  chain submitted as one graph up front is printed too, for reference;
* the 200 MB hand-off: the driver's peak RSS (a fresh process, owned cluster)
  while a 200 MB value goes from one task to the next.

Run: ``python benchmarks/bench_dask.py [--sizes 1000,10000] [--repeat 3]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import dask
from distributed import Client, wait

from asyncflow import WorkflowEngine
from asyncflow.adapters.dask import DaskExecutionBackend

BIN = os.path.dirname(sys.executable)


class ExternalCluster:
    """``dask scheduler`` + ``dask worker`` x2 (1 thread each) on 127.0.0.1."""

    def __init__(self, workers: int = 2) -> None:
        self.tmp = tempfile.mkdtemp(prefix="asyncflow-bench-dask-")
        sched_file = os.path.join(self.tmp, "scheduler.json")
        self.procs: list[subprocess.Popen[bytes]] = []
        self._spawn(
            "scheduler",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--dashboard-address",
            "127.0.0.1:0",
            "--no-show",
            "--scheduler-file",
            sched_file,
        )
        deadline = time.monotonic() + 60
        while not os.path.exists(sched_file):
            if time.monotonic() > deadline or self.procs[0].poll() is not None:
                self.close()
                raise RuntimeError("dask scheduler did not start")
            time.sleep(0.1)
        time.sleep(0.2)
        with open(sched_file) as f:
            self.address: str = json.load(f)["address"]
        for _ in range(workers):
            self._spawn(
                "worker",
                self.address,
                "--nthreads",
                "1",
                "--host",
                "127.0.0.1",
                "--no-dashboard",
            )

    def _spawn(self, *argv: str) -> None:
        here = os.path.dirname(os.path.abspath(__file__))
        path = os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))
        self.procs.append(
            subprocess.Popen(
                [os.path.join(BIN, "dask"), *argv],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
                cwd=self.tmp,
                env={**os.environ, "PYTHONPATH": path},
            )
        )

    def close(self) -> None:
        for p in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        shutil.rmtree(self.tmp, ignore_errors=True)


def noop() -> None:
    return None


def inc(x: int) -> int:
    return x + 1


# -- raw distributed ---------------------------------------------------------------
def raw_fanout(client: Client, n: int) -> float:
    t0 = time.perf_counter()
    futs = [client.submit(noop, pure=False) for _ in range(n)]
    client.gather(futs)
    return time.perf_counter() - t0


def raw_chain_stepwise(client: Client, n: int) -> float:
    t0 = time.perf_counter()
    x = client.submit(inc, 0, pure=False)
    wait(x)
    for _ in range(n - 1):
        x = client.submit(inc, x, pure=False)
        wait(x)
    assert x.result() == n
    return (time.perf_counter() - t0) / n


def raw_chain_graph(client: Client, n: int) -> float:
    t0 = time.perf_counter()
    x = client.submit(inc, 0, pure=False)
    for _ in range(n - 1):
        x = client.submit(inc, x, pure=False)
    assert x.result() == n
    return (time.perf_counter() - t0) / n


# -- asyncflow -------------------------------------------------------------------------
async def af_fanout(target: Any, n: int) -> float:
    flow = WorkflowEngine(DaskExecutionBackend(target))
    task = flow.function_task(noop)
    await flow.start()
    try:
        t0 = time.perf_counter()
        await asyncio.gather(*[task() for _ in range(n)])
        return time.perf_counter() - t0
    finally:
        await flow.shutdown()


async def af_chain(target: Any, n: int) -> float:
    flow = WorkflowEngine(DaskExecutionBackend(target))
    task = flow.function_task(inc)
    await flow.start()
    try:
        t0 = time.perf_counter()
        x = task(0)
        for _ in range(n - 1):
            x = task(x)
        assert await x == n
        return (time.perf_counter() - t0) / n
    finally:
        await flow.shutdown()


# -- 200 MB hand-off, in a fresh process ---------------------------------------
HANDOFF = 200 * 1024 * 1024


def make_big(n: int) -> bytes:
    return b"x" * n


def size_of(data: bytes) -> int:
    return len(data)


async def _handoff() -> dict[str, float]:
    flow = WorkflowEngine(DaskExecutionBackend())
    make, size = flow.function_task(make_big), flow.function_task(size_of)
    await flow.start()
    try:
        assert await size(make(1)) == 1  # warm up: both functions shipped once
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t0 = time.perf_counter()
        assert await size(make(HANDOFF)) == HANDOFF
        elapsed = time.perf_counter() - t0
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    finally:
        await flow.shutdown()
    return {
        "baseline_mb": base / 1024,
        "peak_mb": peak / 1024,
        "delta_mb": (peak - base) / 1024,
        "seconds": elapsed,
    }


def handoff_rss() -> dict[str, float]:
    """Run :func:`_handoff` in a fresh interpreter so ru_maxrss starts clean."""
    here = os.path.dirname(os.path.abspath(__file__))
    code = (
        f"import asyncio, json, sys; sys.path.insert(0, {here!r}); "
        "import bench_dask as b; print(json.dumps(asyncio.run(b._handoff())))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def cpu_seconds() -> float:
    """CPU time of this process and its children (the cluster): on a shared,
    busy machine a steadier measure of work done than wall time."""
    import psutil

    total = 0.0
    for p in [psutil.Process(), *psutil.Process().children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            total += t.user + t.system
    return total


def measured(fn: Any, *args: Any) -> tuple[float, float]:
    c0 = cpu_seconds()
    wall = fn(*args)
    return wall, cpu_seconds() - c0


def run(client: Client, address: str, a: argparse.Namespace) -> None:
    for n in map(int, a.sizes.split(",")):
        raws, afs = [], []
        for _ in range(a.repeat):  # alternating, so load drifts hit both sides
            raws.append(measured(raw_fanout, client, n))
            afs.append(measured(lambda n: asyncio.run(af_fanout(address, n)), n))
        raw, af = (statistics.median(w for w, _ in xs) for xs in (raws, afs))
        rc, ac = (statistics.median(c for _, c in xs) for xs in (raws, afs))
        print(
            f"fanout {n:>6}: raw {n / raw:7.0f}/s  asyncflow {n / af:7.0f}/s  "
            f"throughput ratio {raw / af:.2f}; cpu {rc / n * 1e3:.2f} vs "
            f"{ac / n * 1e3:.2f} ms/task, ratio {rc / ac:.2f}   (wall raw "
            f"{_fmt(raws)} s, asyncflow {_fmt(afs)} s)",
            flush=True,
        )
    raws, graphs, afs = [], [], []
    for _ in range(a.repeat):
        raws.append(raw_chain_stepwise(client, a.chain))
        graphs.append(raw_chain_graph(client, a.chain))
        afs.append(asyncio.run(af_chain(address, a.chain)))
    raw, graph, af = map(statistics.median, (raws, graphs, afs))
    print(
        f"chain  {a.chain:>6}: raw {raw * 1e3:.2f} ms/hop  asyncflow "
        f"{af * 1e3:.2f} ms/hop  latency ratio {af / raw:.2f}   (raw with the "
        f"whole chain submitted up front: {graph * 1e3:.2f} ms/hop, ratio "
        f"{af / graph:.2f})",
        flush=True,
    )


def _fmt(xs: list[tuple[float, float]]) -> str:
    return "/".join(f"{w:.1f}" for w, _ in xs)


# On a shared, overloaded machine a scheduler can starve long enough for the
# kernel to drop a loopback connection with unread data (Dask's default TCP user
# timeout is 30 s); give both sides and the cluster more slack.
SLACK = {
    "DASK_DISTRIBUTED__COMM__TIMEOUTS__TCP": "300s",
    "DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": "120s",
}


def main() -> None:
    os.environ.update(SLACK)
    dask.config.refresh()
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", default="1000,10000")
    p.add_argument("--chain", type=int, default=200)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--no-handoff", action="store_true")
    a = p.parse_args()
    cluster = ExternalCluster()
    try:
        with Client(cluster.address) as client:
            client.wait_for_workers(2, timeout=60)
            client.submit(noop, pure=False).result()
            run(client, cluster.address, a)
    finally:
        cluster.close()
    if not a.no_handoff:
        r = handoff_rss()
        print(
            f"handoff 200 MB: driver peak RSS +{r['delta_mb']:.1f} MB over a "
            f"{r['baseline_mb']:.0f} MB baseline ({r['seconds']:.2f} s)"
        )


if __name__ == "__main__":
    main()
