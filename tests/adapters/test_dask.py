"""The Dask adapter: the conformance suite on three real configurations, plus what
only Dask promises (ownership, resources, data locality, no stray processes).

One runtime per configuration for the whole session: a LocalCluster of worker
processes, a threads-only LocalCluster, and a ``dask scheduler`` with two
``dask worker`` processes started here on loopback.  Each test attaches a new
backend to it, and the engine's shutdown must leave that runtime running.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import cloudpickle
import dask
import psutil
import pytest
from distributed import Client, LocalCluster

from asyncflow import (
    BackendStartError,
    Capability,
    ResourceUnavailableError,
    TaskState,
    WorkerLostError,
    WorkflowEngine,
)
from asyncflow.adapters.dask import DaskExecutionBackend
from asyncflow.conformance import BackendFixtures, ConformanceSuite
from asyncflow.conformance import tasks as t

pytestmark = pytest.mark.timeout(240)

# Worker processes cannot import this test module: ship its functions by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

BIN = Path(sys.executable).parent
# The HTTP server every scheduler runs (dashboard off) on an ephemeral loopback
# port: the default 8787 warns, and warnings are errors here, once it is taken.
LOOPBACK = {
    "host": "127.0.0.1",
    "dashboard_address": None,
    "scheduler_kwargs": {"dashboard_address": "127.0.0.1:0", "dashboard": False},
}


def _warm(client: Client) -> None:
    # Keep every worker thread busy once, so the threads distributed starts
    # lazily (its offload thread, an in-process worker's pool) exist before a
    # test counts threads: they belong to the session's runtime, not a backend.
    threads = sum(client.nthreads().values())
    futures = [client.submit(time.sleep, 0.3, pure=False) for _ in range(threads)]
    client.gather(futures)
    assert client.submit(t.inc, 1, pure=False).result() == 2


@pytest.fixture(scope="session")
def dask_cluster() -> Iterator[LocalCluster]:
    """Two worker processes (one thread each), shared by the whole session."""
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
        cluster = LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, **LOOPBACK
        )
    try:
        with Client(cluster) as client:
            _warm(client)
        yield cluster
    finally:
        cluster.close()


@pytest.fixture(scope="session")
def dask_threads_cluster() -> Iterator[LocalCluster]:
    """Two worker threads in this process (inproc transport)."""
    cluster = LocalCluster(
        n_workers=1,
        threads_per_worker=2,
        processes=False,
        **{k: v for k, v in LOOPBACK.items() if k != "host"},
    )
    try:
        with Client(cluster) as client:
            _warm(client)
        yield cluster
    finally:
        cluster.close()


@pytest.fixture(scope="session")
def dask_scheduler_address(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``dask scheduler`` plus two ``dask worker`` processes on 127.0.0.1."""
    tmp = tmp_path_factory.mktemp("dask-external")
    sched_file = tmp / "scheduler.json"
    env = {**os.environ, "DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "0"}
    procs: list[subprocess.Popen[bytes]] = []

    def spawn(*argv: str, log: str) -> None:
        with open(tmp / log, "wb") as out:
            procs.append(
                subprocess.Popen(
                    [str(BIN / "dask"), *argv],
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    cwd=tmp,
                )
            )

    try:
        spawn(
            "scheduler",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--dashboard-address",
            "127.0.0.1:0",
            "--no-show",
            "--scheduler-file",
            str(sched_file),
            log="scheduler.log",
        )
        deadline = time.monotonic() + 300  # a loaded 2-core CI box is slow
        address = None
        while address is None:
            if procs[0].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    "dask scheduler did not start: "
                    + (tmp / "scheduler.log").read_text()[-2000:]
                )
            try:  # the file appears before the scheduler finishes writing it
                address = json.loads(sched_file.read_text())["address"]
            except (FileNotFoundError, json.JSONDecodeError, KeyError):
                time.sleep(0.1)
        for i in range(2):
            spawn(
                "worker",
                address,
                "--nthreads",
                "1",
                "--host",
                "127.0.0.1",
                "--no-dashboard",
                "--name",
                f"w{i}",
                log=f"worker{i}.log",
            )
        with Client(address, timeout=300) as client:
            client.wait_for_workers(2, timeout=300)
            _warm(client)
        yield address
    finally:
        for p in procs:
            with _suppress_lookup():
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                with _suppress_lookup():
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait()


class _suppress_lookup:
    def __enter__(self) -> None:
        return None

    def __exit__(self, typ: object, *rest: object) -> bool:
        return typ is ProcessLookupError


# -- the conformance suite on three configurations -----------------------------
class TestDaskProcesses(BackendFixtures, ConformanceSuite):
    @pytest.fixture
    def backend(self, dask_cluster: LocalCluster) -> DaskExecutionBackend:
        return DaskExecutionBackend(dask_cluster.scheduler_address)


class TestDaskThreads(BackendFixtures, ConformanceSuite):
    @pytest.fixture
    def backend(self, dask_threads_cluster: LocalCluster) -> DaskExecutionBackend:
        return DaskExecutionBackend(dask_threads_cluster)  # a cluster object


class TestDaskExternalScheduler(BackendFixtures, ConformanceSuite):
    @pytest.fixture
    def backend(self, dask_scheduler_address: str) -> DaskExecutionBackend:
        return DaskExecutionBackend(dask_scheduler_address)


class TestDaskEveryTaskChunked(BackendFixtures, ConformanceSuite):
    """The suite again with every eligible function task sent in chunks, not
    only those of big batches: chunking must change nothing observable."""

    @pytest.fixture
    def backend(self, dask_cluster: LocalCluster) -> DaskExecutionBackend:
        backend = DaskExecutionBackend(dask_cluster.scheduler_address)
        backend._chunks.burst = 1
        return backend


# -- chunks --------------------------------------------------------------------------
def _busy(seconds: float) -> float:
    """Works (rather than sleeps) so that chunking sees real task durations."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass
    return seconds


def test_chunked_fan_out_chain_and_trace(dask_cluster: LocalCluster) -> None:
    """Big batches of short tasks travel in chunks: a 2,000-task fan-out and a
    500-hop chain give the right values, and a trace draws each chunked task
    over its own run, on no more tracks than the cluster has worker threads."""
    # one each, as the fixture configures them: the cluster's cached
    # scheduler_info can miss a worker on a busy machine
    threads = len(dask_cluster.workers)

    async def main() -> list[dict[str, object]]:
        backend = DaskExecutionBackend(dask_cluster)
        async with WorkflowEngine(backend) as flow:
            inc = flow.function_task(t.inc)
            assert await asyncio.gather(*(inc(i) for i in range(2000))) == [
                i + 1 for i in range(2000)
            ]
            x = inc(0)
            for _ in range(499):
                x = inc(x)
            assert await x == 500
            assert backend._chunks.queue is not None
            recorder = flow.record_trace()
            busy = flow.function_task(_busy)
            await asyncio.gather(*(busy(0.002) for _ in range(200)))
        return list(recorder.chrome_trace()["traceEvents"])

    trace = asyncio.run(main())
    bars = [e for e in trace if e["ph"] == "X"]
    lanes = {e["args"]["name"] for e in trace if e.get("name") == "thread_name"}
    assert len(bars) == 200
    assert lanes and all(n.startswith("worker pid ") for n in lanes), lanes
    assert len(lanes) <= threads, lanes
    assert all(0 < e["dur"] < 1e6 for e in bars), "each task over its own run"
    # a task ending at the microsecond the next starts is not drawn over it
    edges = [(e["ts"], 1) for e in bars] + [
        (e["ts"] + e["dur"] - 1e-3, -1) for e in bars
    ]
    at_once = max(itertools.accumulate(step for _, step in sorted(edges)))
    assert at_once <= threads, f"{at_once} tasks drawn at once on {threads} threads"


# -- ownership -----------------------------------------------------------------------
def _dask_children() -> dict[int, str]:
    """Child processes of this one, minus multiprocessing's resource tracker
    (started once per interpreter by the first spawn, shared, never dask's)."""
    out = {}
    for p in psutil.Process().children(recursive=True):
        with _suppress_gone():
            cmd = " ".join(p.cmdline())
            if "resource_tracker" not in cmd:
                out[p.pid] = cmd
    return out


class _suppress_gone:
    def __enter__(self) -> None:
        return None

    def __exit__(self, typ: object, *rest: object) -> bool:
        return isinstance(typ, type) and issubclass(typ, psutil.Error)


def _exit_worker() -> None:
    os._exit(3)


def test_owned_cluster_defaults_and_no_process_left() -> None:
    """``DaskExecutionBackend()`` starts 2 single-thread worker processes on
    loopback, a task killing its worker is WorkerLostError (not three reruns),
    and after shutdown none of the processes it started is left."""
    before = _dask_children()

    async def main() -> tuple[dict[str, object], dict[int, str]]:
        backend = DaskExecutionBackend()
        async with WorkflowEngine(backend) as flow:
            assert await flow.function_task(t.inc)(1) == 2
            client = backend.client
            assert client is not None
            info = await client.scheduler.identity(n_workers=-1)
            during = _dask_children()
            with pytest.raises(WorkerLostError):
                await flow.function_task(_exit_worker)()
        return info, during

    info, during = asyncio.run(main())
    assert info["address"].startswith("tcp://127.0.0.1:")
    workers = info["workers"]
    assert len(workers) == 2
    assert all(
        w["nthreads"] == 1 and w["host"] == "127.0.0.1" for w in workers.values()
    )
    started = set(during) - set(before)
    assert len(started) >= 2, during
    deadline = time.monotonic() + 30
    while (left := set(_dask_children()) & started) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, f"processes left after shutdown: {_dask_children()}"


def test_cluster_options_pass_through() -> None:
    async def main() -> tuple[int, bool, str]:
        backend = DaskExecutionBackend(
            n_workers=1, threads_per_worker=3, processes=False
        )
        async with WorkflowEngine(backend) as flow:
            assert await flow.function_task(t.inc)(1) == 2
            assert backend.client is not None
            info = await backend.client.scheduler.identity(n_workers=-1)
            (w,) = info["workers"].values()
            caps = backend.info.capabilities
            return w["nthreads"], Capability.PARALLEL in caps, backend.info.name

    assert asyncio.run(main()) == (3, True, "dask-threads")


def test_attached_runtime_and_callers_client_stay_up(
    dask_cluster: LocalCluster,
) -> None:
    with Client(dask_cluster) as mine:

        async def main() -> None:
            async with WorkflowEngine(DaskExecutionBackend(mine)) as flow:
                assert await flow.function_task(t.inc)(1) == 2

        asyncio.run(main())
        assert mine.status == "running"
        assert mine.submit(t.inc, 41, pure=False).result() == 42
    assert dask_cluster.status.name == "running"


def test_unreachable_scheduler_is_a_start_error() -> None:
    async def main() -> None:
        flow = WorkflowEngine(DaskExecutionBackend("tcp://127.0.0.1:9", timeout=2))
        try:
            with pytest.raises(BackendStartError, match="127.0.0.1:9"):
                await flow.start()
        finally:
            await flow.shutdown()

    asyncio.run(main())


# -- mapping -------------------------------------------------------------------------
def _append(path: str) -> int:
    with open(path, "a") as f:
        f.write("x\n")
    return 1


def test_identical_calls_each_run(dask_cluster: LocalCluster, tmp_path: Path) -> None:
    """Every task has its own key: two identical calls are two runs."""
    marker = str(tmp_path / "runs")

    async def main() -> list[int]:
        async with WorkflowEngine(DaskExecutionBackend(dask_cluster)) as flow:
            task = flow.function_task(_append)
            return await asyncio.gather(task(marker), task(marker), task(marker))

    assert asyncio.run(main()) == [1, 1, 1]
    assert t.count_lines(marker) == 3


def _resources_in_use() -> dict[str, float]:
    from distributed import get_worker

    state = get_worker().state
    return {
        k: state.total_resources[k] - v for k, v in state.available_resources.items()
    }


def test_resources_map_to_dask_worker_resources() -> None:
    async def main() -> None:
        backend = DaskExecutionBackend(
            n_workers=1,
            threads_per_worker=4,
            processes=False,
            resources={"CPU": 4, "GPU": 1, "MEMORY": 1024 * 2**20},
        )
        async with WorkflowEngine(backend) as flow:
            probe = flow.function_task(_resources_in_use)
            assert Capability.GPUS in backend.info.capabilities
            used = await flow.function_task(
                resources={"cores": 3, "gpus": 1, "memory": 512}
            )(_resources_in_use)()
            assert used == {"CPU": 3, "GPU": 1, "MEMORY": 512 * 2**20}
            assert await probe() == {"CPU": 0, "GPU": 0, "MEMORY": 0}
            for impossible in (
                {"cores": 5},
                {"gpus": 2},
                {"memory": 2048},
                {"ranks": 2},
            ):
                task = flow.function_task(resources=impossible)(t.inc)
                with pytest.raises(ResourceUnavailableError):
                    await asyncio.wait_for(task(1), 30)

    asyncio.run(main())


def test_resources_without_declared_resources_use_threads_and_memory(
    dask_cluster: LocalCluster,
) -> None:
    """An attached cluster advertising no resources: cores are checked against
    each worker's threads, memory against its memory limit."""

    async def main() -> None:
        async with WorkflowEngine(DaskExecutionBackend(dask_cluster)) as flow:
            ok = flow.function_task(resources={"cores": 1, "memory": 16})(t.inc)
            assert await ok(1) == 2
            for impossible in ({"cores": 2}, {"memory": 10**9}):
                task = flow.function_task(resources=impossible)(t.inc)
                with pytest.raises(ResourceUnavailableError, match="inc"):
                    await asyncio.wait_for(task(1), 30)

    asyncio.run(main())


# -- data locality -------------------------------------------------------------------
def _make(n: int) -> bytes:
    return b"x" * n


def test_results_stay_on_workers_until_awaited(dask_cluster: LocalCluster) -> None:
    async def main() -> None:
        async with WorkflowEngine(DaskExecutionBackend(dask_cluster)) as flow:
            make, size = flow.function_task(_make), flow.function_task(t.nbytes)
            small, big = make(10), make(1 << 20)
            assert await small == b"x" * 10  # small: came with the completion
            assert await size(big) == 1 << 20  # big: went worker to worker
            assert big.state is TaskState.DONE and not big.done(), "not fetched"
            assert await big == b"x" * (1 << 20)  # fetched when awaited
            results = await asyncio.gather(*[make(i) for i in range(200)])
            assert [len(r) for r in results] == list(range(200))

    asyncio.run(main())


HANDOFF = textwrap.dedent("""
    import asyncio, json, resource
    from asyncflow import WorkflowEngine
    from asyncflow.adapters.dask import DaskExecutionBackend
    from asyncflow.conformance import tasks as t

    def rss():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    async def main():
        flow = WorkflowEngine(DaskExecutionBackend())
        make, size = flow.function_task(t.make_bytes), flow.function_task(t.nbytes)
        try:
            assert await size(make(2**20)) == 2**20  # ship both functions once
            base = rss()
            assert await size(make(200 * 2**20)) == 200 * 2**20
            peak = rss()
        finally:
            await flow.shutdown()
        print(json.dumps({"base": base, "peak": peak}))

    asyncio.run(main())
""")


@pytest.mark.timeout(480)
def test_200mb_handoff_never_reaches_the_driver() -> None:
    """A fresh interpreter, so its peak RSS (ru_maxrss) starts clean."""
    out = subprocess.run(
        [sys.executable, "-c", HANDOFF], capture_output=True, text=True, timeout=420
    )
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    grew = (r["peak"] - r["base"]) / 2**20
    assert grew < 100, f"driver peak RSS grew {grew:.0f} MB for a 200 MB hand-off"


# -- no thread per task --------------------------------------------------------------
def test_no_thread_per_task(dask_cluster: LocalCluster) -> None:
    async def main() -> int:
        async with WorkflowEngine(DaskExecutionBackend(dask_cluster)) as flow:
            wait = flow.function_task(t.gate_wait)
            inc = flow.function_task(t.inc)
            from asyncflow.conformance import Gate

            async with Gate() as gate:
                held = wait(gate.address, "h")
                await gate.arrived("h")
                futs = [inc(i) for i in range(300)]
                await asyncio.sleep(0)
                peak = threading.active_count()
                gate.release("h")
                await asyncio.gather(held, *futs)
            return peak

    before = threading.active_count()
    assert asyncio.run(main()) <= before + 4


def _sizes(items: frozenset[bytes]) -> list[int]:
    return sorted(len(x) for x in items)


@pytest.mark.timeout(120)
def test_results_inside_frozensets_reach_the_task_as_values() -> None:
    """Dask passes its futures through frozensets unresolved; the adapter sends
    such a frozenset in a form Dask resolves and rebuilds it on the worker,
    nested ones and those inside sets included."""

    async def main() -> None:
        backend = DaskExecutionBackend(
            n_workers=1, threads_per_worker=1, processes=False
        )
        async with WorkflowEngine(backend) as flow:
            inc, pack = flow.function_task(t.inc), flow.function_task(t.pack)
            a, b = inc(1), inc(2)
            out = await pack(
                frozenset([a, 7]),
                {frozenset([b])},
                k=[frozenset([frozenset([a]), b])],
            )
            assert out == (
                (frozenset({2, 7}), {frozenset({3})}),
                {"k": [frozenset({frozenset({2}), 3})]},
            )
            big = flow.function_task(t.make_bytes)(1 << 20)
            assert await flow.function_task(t.nbytes)(big) == 1 << 20
            assert not big.done(), "a done result left on the cluster"
            sizes = flow.function_task(_sizes)
            assert await sizes(frozenset([big, b"x"])) == [1, 1 << 20]

    asyncio.run(main())
