"""The Parsl adapter against real Parsl runtimes.

One DataFlowKernel per session and executor kind: a local HighThroughputExecutor
(2 workers on 127.0.0.1) and a ThreadPoolExecutor.  Each test attaches a fresh
``ParslExecutionBackend(dfk)``; the fixture, not the engine, cleans the DFK up.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from parsl.config import Config
from parsl.dataflow.dflow import DataFlowKernel
from parsl.executors import HighThroughputExecutor, ThreadPoolExecutor

from asyncflow import (
    Capability,
    ResourceUnavailableError,
    SerializationError,
    TaskDefinitionError,
    WorkflowEngine,
)
from asyncflow.adapters.parsl import (
    ParslExecutionBackend,
    QuietFileLogging,
    local_htex_config,
)
from asyncflow.adapters.parsl.config import fix_path
from asyncflow.conformance import BackendFixtures, ConformanceSuite, Gate
from asyncflow.conformance import tasks as t

pytestmark = pytest.mark.timeout(240)


def _wait_for_workers(dfk: DataFlowKernel, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    for ex in dfk.executors.values():
        if isinstance(ex, HighThroughputExecutor):
            while not sum(m["worker_count"] for m in ex.connected_managers()):
                assert not ex.bad_state_is_set, ex.executor_exception
                assert time.monotonic() < deadline, "HTEX workers never connected"
                time.sleep(0.05)


def _warm_up(dfk: DataFlowKernel, concurrency: int) -> None:
    """Run tasks once so Parsl's lazily started driver threads (the DFK's launch
    thread, the thread pool's threads) exist before any test counts threads."""

    async def main() -> None:
        flow = WorkflowEngine(ParslExecutionBackend(dfk))
        try:
            async with Gate() as gate:
                gate.barrier("warm", concurrency)
                wait = flow.function_task(t.gate_wait)
                await asyncio.gather(
                    *(wait(gate.address, "warm", 60) for _ in range(concurrency))
                )
        finally:
            await flow.shutdown()

    asyncio.run(main())


def _block_processes(dfk: DataFlowKernel) -> list[psutil.Process]:
    """The interchange and every process of the HTEX worker blocks."""
    procs = []
    for ex in dfk.executors.values():
        if not isinstance(ex, HighThroughputExecutor):
            continue
        if ex.interchange_proc is not None:
            procs.append(psutil.Process(ex.interchange_proc.pid))
        groups = {
            os.getpgid(job["remote_pid"]) for job in ex.provider.resources.values()
        }
        for p in psutil.process_iter():
            try:
                if os.getpgid(p.pid) in groups:
                    procs.append(p)
            except (ProcessLookupError, psutil.Error):
                pass
    return procs


def _assert_gone(procs: list[psutil.Process], within: float = 20) -> None:
    _, alive = psutil.wait_procs(procs, timeout=within)
    assert not alive, f"Parsl processes left after shutdown: {alive}"


@pytest.fixture(scope="session")
def htex_dfk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DataFlowKernel]:
    run_dir = tmp_path_factory.mktemp("parsl-htex") / "runinfo"
    # heartbeat_period=1: a worker killed to cancel its function is replaced
    # within a second or two, before the next test wants two workers.
    dfk = DataFlowKernel(local_htex_config(str(run_dir), heartbeat_period=1))
    procs: list[psutil.Process] = []
    try:
        _wait_for_workers(dfk)
        procs = _block_processes(dfk)
        _warm_up(dfk, 2)
        yield dfk
    finally:
        dfk.cleanup()
        _assert_gone(procs)


@pytest.fixture(scope="session")
def threads_dfk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DataFlowKernel]:
    run_dir = tmp_path_factory.mktemp("parsl-threads") / "runinfo"
    config = Config(
        executors=[ThreadPoolExecutor(label="threads", max_threads=2)],
        run_dir=str(run_dir),
        initialize_logging=QuietFileLogging(),
    )
    dfk = DataFlowKernel(config)
    try:
        _warm_up(dfk, 2)
        yield dfk
    finally:
        dfk.cleanup()


class TestParslHTEX(BackendFixtures, ConformanceSuite):
    scenario_timeout = 60.0  # a hang fails in a minute, not two

    @pytest.fixture
    def backend(self, htex_dfk: DataFlowKernel) -> ParslExecutionBackend:
        return ParslExecutionBackend(htex_dfk)


class TestParslHTEXEveryTaskChunked(BackendFixtures, ConformanceSuite):
    """The suite again with every eligible function task sent in chunks, not
    only those of big batches: chunking must change nothing observable."""

    scenario_timeout = 60.0

    @pytest.fixture
    def backend(self, htex_dfk: DataFlowKernel) -> ParslExecutionBackend:
        backend = ParslExecutionBackend(htex_dfk)
        backend._chunks.burst = 1
        return backend


class TestParslThreadPool(BackendFixtures, ConformanceSuite):
    scenario_timeout = 60.0

    @pytest.fixture
    def backend(self, threads_dfk: DataFlowKernel) -> ParslExecutionBackend:
        return ParslExecutionBackend(threads_dfk)


# -- adapter-specific behaviour ----------------------------------------------------


def test_capabilities_are_declared_per_executor_kind(
    htex_dfk: DataFlowKernel, threads_dfk: DataFlowKernel
) -> None:
    htex = ParslExecutionBackend(htex_dfk).info.capabilities
    for cap in (
        Capability.CANCEL_RUNNING,
        Capability.KILL_EXECUTABLES,
        Capability.SERIALIZES,
        Capability.RESOURCES,
        Capability.PARALLEL,
    ):
        assert cap in htex, cap
    assert Capability.GPUS not in htex and "accelerators" in htex.why_not(
        Capability.GPUS
    )
    threads = ParslExecutionBackend(threads_dfk).info.capabilities
    assert Capability.KILL_EXECUTABLES in threads
    assert Capability.CANCEL_RUNNING not in threads
    assert "thread" in threads.why_not(Capability.CANCEL_RUNNING)
    assert Capability.SERIALIZES not in threads


async def test_chunked_fan_out_and_chain_give_the_right_values(
    htex_dfk: DataFlowKernel,
) -> None:
    backend = ParslExecutionBackend(htex_dfk)
    assert Capability.PIPELINE in backend.info.capabilities
    async with WorkflowEngine(backend) as flow:
        inc = flow.function_task(t.inc)
        assert await asyncio.gather(*(inc(i) for i in range(2000))) == list(
            range(1, 2001)
        )
        x = inc(0)
        for _ in range(499):
            x = inc(x)
        assert await x == 500
        queue = backend._chunks.queue
        assert queue is not None and queue._times, "the tasks went in chunks"
        assert not backend._state.tasks and not queue.pipes.live
        alone = flow.function_task(chunk=False)(t.inc)
        before = next(backend._state.counter)
        assert await asyncio.gather(*(alone(i) for i in range(40))) == list(
            range(1, 41)
        )
        assert next(backend._state.counter) == before + 41, "a Parsl task each"


def test_chunking_is_off_where_it_cannot_help(
    htex_dfk: DataFlowKernel, threads_dfk: DataFlowKernel
) -> None:
    off = ParslExecutionBackend(htex_dfk, chunking=False)
    assert not off._chunks.enabled
    assert Capability.PIPELINE not in off.info.capabilities
    threads = ParslExecutionBackend(threads_dfk)
    assert not threads._chunks.enabled, "in-process: values pass by reference"
    assert Capability.PIPELINE not in threads.info.capabilities


async def test_parsl_keyword_names_reach_the_function(htex_dfk: DataFlowKernel) -> None:
    """inputs/outputs/stdout/walltime mean something to Parsl; here they are data."""
    async with WorkflowEngine(ParslExecutionBackend(htex_dfk)) as flow:
        pack = flow.function_task(t.pack)
        kwargs = {"inputs": [1], "outputs": [2], "stdout": "x", "walltime": 0.001}
        assert await pack(**kwargs) == ((), kwargs)


async def test_cancelled_pending_tasks_never_run(
    htex_dfk: DataFlowKernel, tmp_path: Path
) -> None:
    async with WorkflowEngine(ParslExecutionBackend(htex_dfk)) as flow, Gate() as gate:
        wait = flow.function_task(t.gate_wait)
        flaky = flow.function_task(t.flaky)
        touch = flow.executable_task(lambda p: ["touch", p])
        busy = [wait(gate.address, "busy") for _ in range(2)]
        await gate.arrived("busy", 2)  # both workers taken: the rest queue up
        fn_marker, cmd_marker = str(tmp_path / "fn"), str(tmp_path / "cmd")
        queued = [flaky(fn_marker, 0), touch(cmd_marker)]
        await asyncio.sleep(0.5)  # let them reach the interchange
        for fut in queued:
            fut.cancel()
        gate.release("busy")
        assert await asyncio.gather(*busy) == ["go", "go"]
        # Drain the queue behind the cancelled tasks, on both workers.
        assert (
            await asyncio.gather(*(flaky(str(tmp_path / f"d{i}"), 0) for i in range(4)))
            == [1] * 4
        )
    assert not os.path.exists(fn_marker) and not os.path.exists(cmd_marker)


async def test_resource_specification_passes_through(htex_dfk: DataFlowKernel) -> None:
    async with WorkflowEngine(ParslExecutionBackend(htex_dfk)) as flow:
        spec = {"parsl_resource_specification": {"priority": 1}}
        assert await flow.function_task(options=spec)(t.inc)(1) == 2
        bad = {"parsl_resource_specification": {"walltime_hours": 1}}
        with pytest.raises(ResourceUnavailableError, match="inc"):
            await flow.function_task(options=bad)(t.inc)(1)
        with pytest.raises(ResourceUnavailableError, match="MPI"):
            await flow.function_task(resources={"ranks": 4})(t.inc)(1)


async def test_several_executors_by_option_and_by_backend_name(
    tmp_path: Path,
) -> None:
    def config() -> Config:
        return Config(
            executors=[
                ThreadPoolExecutor(label="a", max_threads=1),
                ThreadPoolExecutor(label="b", max_threads=1),
            ],
            run_dir=str(tmp_path / "runinfo"),
            initialize_logging=False,
        )

    def thread_name() -> str:
        return threading.current_thread().name

    async with WorkflowEngine(ParslExecutionBackend(config())) as flow:
        name = flow.function_task(thread_name)
        on_b = flow.function_task(options={"executor": "b"})(thread_name)
        assert "-a" in await name() and "-b" in await on_b()
        nowhere = flow.function_task(options={"executor": "zz"})(thread_name)
        with pytest.raises(TaskDefinitionError, match="zz"):
            await nowhere()

    backends = ParslExecutionBackend.per_executor(config())
    assert sorted(backends) == ["a", "b"]
    async with WorkflowEngine(backends) as flow:
        on_a = flow.function_task(backend="a")(thread_name)
        on_b = flow.function_task(backend="b")(thread_name)
        assert "-a" in await on_a() and "-b" in await on_b()
        dfk = backends["a"].dfk
    assert dfk is not None and dfk.cleanup_called, "the last backend cleaned it up"


@pytest.mark.slow
async def test_default_backend_leaves_no_process_or_directory() -> None:
    backend = ParslExecutionBackend()
    flow = WorkflowEngine(backend)
    async with Gate() as gate:
        await flow.start()
        dfk = backend.dfk
        assert dfk is not None
        run_dir = dfk.run_dir
        procs = _block_processes(dfk)
        assert len(procs) >= 3, procs  # interchange, manager, workers
        assert await flow.function_task(t.inc)(1) == 2
        running = flow.executable_task(lambda: gate.command("held"))()
        (cmd_pid,) = await gate.arrived("held")
        procs.append(psutil.Process(cmd_pid))
        await flow.shutdown()
        assert running.cancelled()
    _assert_gone(procs)
    assert not os.path.exists(run_dir)


class Unpicklable(Exception):
    def __init__(self) -> None:
        super().__init__("holds a lock")
        self.lock = threading.Lock()


def raise_unpicklable() -> None:
    raise Unpicklable()


async def test_unpicklable_exception_and_odd_results(htex_dfk: DataFlowKernel) -> None:
    async with WorkflowEngine(ParslExecutionBackend(htex_dfk)) as flow:
        with pytest.raises(SerializationError, match="Unpicklable"):
            await flow.function_task(raise_unpicklable)()
        assert await flow.function_task(lambda: b"raw bytes")() == b"raw bytes"
        assert await flow.function_task(lambda: {1: (2, None)})() == {1: (2, None)}
        with pytest.raises(SerializationError, match="lock"):
            await flow.function_task(threading.Lock)()


def test_class_capabilities_match_the_default_backend() -> None:
    backend = ParslExecutionBackend()  # not started: nothing runs yet
    try:
        assert backend.info.capabilities == ParslExecutionBackend.CAPABILITIES
    finally:
        asyncio.run(backend.shutdown())


def test_options_shape_capabilities(htex_dfk: DataFlowKernel) -> None:
    caps = ParslExecutionBackend(htex_dfk, kill_running_functions=False).info
    assert Capability.CANCEL_RUNNING not in caps.capabilities
    assert Capability.KILL_EXECUTABLES in caps.capabilities
    with pytest.raises(TaskDefinitionError, match="nope"):
        ParslExecutionBackend(htex_dfk, executor="nope")


def test_path_gets_the_interpreters_bin(monkeypatch: pytest.MonkeyPatch) -> None:
    bindir = os.path.dirname(sys.executable)
    path = os.pathsep.join(
        p for p in os.environ["PATH"].split(os.pathsep) if os.path.abspath(p) != bindir
    )
    monkeypatch.setenv("PATH", path or "/usr/bin")
    fix_path([HighThroughputExecutor(label="x", address="127.0.0.1")])
    assert os.environ["PATH"].split(os.pathsep)[0] == bindir
