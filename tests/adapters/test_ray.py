"""The Ray adapter against a real local Ray.

One Ray for the whole session, started by an owning ``RayExecutionBackend()``
(the adapter's own start path: loopback, temp dir, no usage stats).  Every test
attaches a fresh backend to it; the engine shuts that backend down, which must
leave the Ray running.  The last test shuts the owning backend down and checks
that none of Ray's processes survive; anything collected after it gets a new Ray.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
import time
from collections.abc import Iterator
from typing import Any

import psutil
import pytest
import ray

from asyncflow import (
    BackendStartError,
    DependencyFailureError,
    ResourceUnavailableError,
    SerializationError,
    TaskDefinitionError,
    TaskState,
    WorkflowEngine,
)
from asyncflow.adapters.ray import RayExecutionBackend, RayValue
from asyncflow.conformance import BackendFixtures, ConformanceSuite, Gate
from asyncflow.conformance import tasks as t

pytestmark = pytest.mark.timeout(300)

# Ray workers cannot import this test module: ship its functions by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}
MB = 1024 * 1024
HOME_TOKEN = os.path.expanduser("~/.ray/auth_token")


class _NullSink:
    def set_result(self, uid: str, value: Any) -> None: ...
    def set_exception(self, uid: str, exc: BaseException) -> None: ...
    def set_running(self, uid: str) -> None: ...


class RaySession:
    """The session's Ray, (re)started on demand by an owning backend."""

    def __init__(self) -> None:
        self.owner: RayExecutionBackend | None = None
        self.had_home_token = os.path.exists(HOME_TOKEN)

    def ensure(self) -> RayExecutionBackend:
        if self.owner is None:
            for attempt in range(3):
                owner = RayExecutionBackend()
                try:
                    asyncio.run(owner.start(_NullSink()))
                    break
                except BackendStartError:
                    # The raylet has a fixed 30 s to register (the adapter
                    # already retries once); a shared 2-core box under heavy
                    # load can miss it more often than that.
                    asyncio.run(owner.shutdown())
                    if attempt == 2:
                        raise
            self.owner = owner
            asyncio.run(_warm_up())
        return self.owner

    def close(self) -> None:
        owner, self.owner = self.owner, None
        if owner is not None:
            asyncio.run(owner.shutdown())


async def _warm_up() -> None:
    """Start both workers before any test counts processes or threads."""
    flow = WorkflowEngine(RayExecutionBackend(address="auto"))
    try:
        async with Gate() as gate:
            gate.barrier("warm", 2)
            wait = flow.function_task(t.gate_wait)
            await asyncio.gather(*(wait(gate.address, "warm", 60) for _ in range(2)))
            assert await flow.executable_task(lambda: "true")() == ""
    finally:
        await flow.shutdown()


@pytest.fixture(scope="session")
def ray_session() -> Iterator[RaySession]:
    session = RaySession()
    try:
        yield session
    finally:
        session.close()


@pytest.fixture
def owner(ray_session: RaySession) -> RayExecutionBackend:
    return ray_session.ensure()


@pytest.fixture
def backend(owner: RayExecutionBackend) -> RayExecutionBackend:
    return RayExecutionBackend(address=owner.address)


def run(coro_fn: Any, backend: RayExecutionBackend, timeout: float = 120) -> Any:
    async def main() -> Any:
        flow = WorkflowEngine(backend)
        try:
            return await asyncio.wait_for(coro_fn(flow), timeout)
        finally:
            await asyncio.wait_for(flow.shutdown(), 60)

    return asyncio.run(main())


class TestRay(BackendFixtures, ConformanceSuite):
    @pytest.fixture
    def backend(self, owner: RayExecutionBackend) -> RayExecutionBackend:
        return RayExecutionBackend(address=owner.address)


class TestRayEveryTaskChunked(BackendFixtures, ConformanceSuite):
    """The suite again with every eligible function task sent in chunks, not
    only those of big batches: chunking must change nothing observable."""

    @pytest.fixture
    def backend(self, owner: RayExecutionBackend) -> RayExecutionBackend:
        backend = RayExecutionBackend(address=owner.address)
        backend._chunks.burst = 1
        return backend


# -- Ray-specific promises ------------------------------------------------------
def _assigned() -> dict[str, float]:
    return dict(ray.get_runtime_context().get_assigned_resources())


def test_one_remote_wrapper_per_function(backend: RayExecutionBackend) -> None:
    async def scenario(flow: WorkflowEngine) -> None:
        inc, add = flow.function_task(t.inc), flow.function_task(t.add)
        assert await add(inc(1), inc(2)) == 5
        assert sum(await asyncio.gather(*(inc(i) for i in range(20)))) == 210
        runners = backend._submitter.runners
        assert len(runners) == 2, "one ray.remote per function, not per call"

    run(scenario, backend)


def test_resources_become_ray_options(backend: RayExecutionBackend) -> None:
    async def scenario(flow: WorkflowEngine) -> None:
        plain = flow.function_task(_assigned)
        two = flow.function_task(resources={"cores": 2, "memory": 64})(_assigned)
        assert (await plain())["CPU"] == 1
        got = await two()
        assert got["CPU"] == 2 and got["memory"] == 64 * MB
        gpu = flow.function_task(resources={"gpus": 1})(t.inc)
        start = time.monotonic()
        with pytest.raises(ResourceUnavailableError, match="inc.*gpus=1"):
            await gpu(1)
        assert time.monotonic() - start < 5, "infeasible requests fail fast"
        mpi = flow.function_task(resources={"ranks": 4})(t.inc)
        with pytest.raises(ResourceUnavailableError, match="MPI"):
            await mpi(1)

    run(scenario, backend)


def test_big_results_stay_in_the_object_store(backend: RayExecutionBackend) -> None:
    async def scenario(flow: WorkflowEngine) -> None:
        make, pack = flow.function_task(t.make_bytes), flow.function_task(t.pack)
        big = make(MB)
        nested = pack(big, [big, (big,)], {big}, key={"k": big}, top=big)
        args, kwargs = await nested
        assert args[0] == args[1][0] == args[1][1][0] == b"x" * MB
        assert args[2] == {b"x" * MB}
        assert kwargs == {"key": {"k": b"x" * MB}, "top": b"x" * MB}
        assert big.state is TaskState.DONE
        assert isinstance(big._remote, RayValue), "the 1 MB result was not fetched"
        assert await big == b"x" * MB, "fetched when awaited"
        assert await flow.function_task(t.inc)(1) == 2

    run(scenario, backend)


def test_failing_chains_never_abort_the_driver(backend: RayExecutionBackend) -> None:
    """The engine cancels the piped dependents of a failed task one by one;
    cancelling one while Ray fails it for its failed argument aborted the
    whole driver process (Ray 2.60), about once in a hundred chains."""

    async def scenario(flow: WorkflowEngine) -> None:
        boom, inc = flow.function_task(t.boom), flow.function_task(t.inc)
        for _ in range(150):
            first = boom()
            tail = inc(inc(inc(first)))
            with pytest.raises(DependencyFailureError):
                await tail
            with pytest.raises(ValueError):
                await first

    run(scenario, backend)


def _long_error() -> None:
    raise ValueError("e" * 120_000)  # over 100 KiB: stored in the shared store


def test_error_with_a_long_message_is_still_an_error(
    backend: RayExecutionBackend,
) -> None:
    async def scenario(flow: WorkflowEngine) -> None:
        failing = flow.function_task(_long_error)()
        dependent = flow.function_task(t.inc)(failing)
        with pytest.raises(ValueError, match="eeee"):
            await failing
        with pytest.raises(DependencyFailureError):
            await dependent

    run(scenario, backend)


def _vm_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(field)


def test_200mb_hand_off_keeps_driver_rss_low(backend: RayExecutionBackend) -> None:
    size = 200 * MB

    async def scenario(flow: WorkflowEngine) -> tuple[int, int]:
        make, nbytes = flow.function_task(t.make_bytes), flow.function_task(t.nbytes)
        await flow.start()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset this process's peak RSS (VmHWM) to now
        baseline = _vm_kb("VmRSS")
        produced = make(size)
        assert await nbytes(produced) == size
        assert isinstance(produced._remote, RayValue)
        return baseline, _vm_kb("VmHWM")

    baseline, peak = run(scenario, backend)
    grew = (peak - baseline) / 1024
    print(f"driver peak RSS over baseline during a 200 MB hand-off: {grew:.1f} MB")
    assert grew < 100, f"driver RSS rose {grew:.0f} MB for a 200 MB hand-off"


def test_cancel_kills_the_commands_whole_process_group(
    backend: RayExecutionBackend,
) -> None:
    async def scenario(flow: WorkflowEngine) -> None:
        async with Gate() as gate:
            one, two = (shlex.join(gate.command(tag)) for tag in ("one", "two"))
            cmd = flow.executable_task(lambda: f"{one} & {two} & wait")()
            pids = [*(await gate.arrived("one")), *(await gate.arrived("two"))]
            shell = psutil.Process(pids[0]).ppid()
            cmd.cancel()
            with pytest.raises(asyncio.CancelledError):
                await cmd
            _, alive = await asyncio.to_thread(
                psutil.wait_procs, [psutil.Process(p) for p in (*pids, shell)], 30
            )
            assert not alive, f"still running after cancel: {alive}"

    run(scenario, backend)


def test_cancel_pending_task_never_runs(backend: RayExecutionBackend) -> None:
    async def scenario(flow: WorkflowEngine) -> None:
        async with Gate() as gate:
            wait = flow.function_task(t.gate_wait)
            busy = [wait(gate.address, "busy") for _ in range(2)]
            await gate.arrived("busy", 2)
            queued = wait(gate.address, "queued")
            await asyncio.sleep(0.2)  # let it reach Ray's queue
            queued.cancel()
            gate.release("busy")
            assert await asyncio.gather(*busy) == ["go", "go"]
            assert await flow.function_task(t.inc)(1) == 2
            assert gate.count("queued") == 0

    run(scenario, backend)


def test_ray_task_options_pass_through(backend: RayExecutionBackend) -> None:
    async def scenario(flow: WorkflowEngine) -> None:
        spread = flow.function_task(options={"ray": {"scheduling_strategy": "SPREAD"}})
        assert await spread(t.inc)(1) == 2
        ours = flow.function_task(options={"ray": {"max_retries": 3}})(t.inc)
        with pytest.raises(TaskDefinitionError, match="max_retries"):
            await ours(1)

    run(scenario, backend)


def test_unserialisable_argument_fails_clearly(backend: RayExecutionBackend) -> None:
    import threading

    async def scenario(flow: WorkflowEngine) -> None:
        with pytest.raises(SerializationError, match="pack"):
            await flow.function_task(t.pack)(threading.Lock())

    run(scenario, backend)


def test_attached_backend_leaves_ray_running(owner: RayExecutionBackend) -> None:
    attached = RayExecutionBackend(address=owner.address)
    assert run(lambda flow: flow.function_task(t.inc)(1), attached) == 2
    assert ray.is_initialized()
    again = RayExecutionBackend(address=owner.address)
    assert run(lambda flow: flow.function_task(t.inc)(2), again) == 3


def _ray_processes(owner: RayExecutionBackend) -> list[psutil.Process]:
    procs = owner._process.ray_processes()
    assert {p.name() for p in procs} >= {"gcs_server", "raylet"}, procs
    return procs


def test_local_ray_listens_on_loopback_only(owner: RayExecutionBackend) -> None:
    assert ray.util.get_node_ip_address() == "127.0.0.1"
    listening = []
    # Only Ray's own processes: this pytest process also hosts other runtimes'
    # servers from earlier tests, which are not Ray's to answer for.
    for proc in _ray_processes(owner):
        for conn in proc.net_connections(kind="inet"):
            if conn.status == psutil.CONN_LISTEN:
                listening.append((proc.name(), conn.laddr.ip, conn.laddr.port))
    assert listening, "found no listening socket at all"
    exposed = [entry for entry in listening if entry[1] not in LOOPBACK]
    assert not exposed, f"Ray listens beyond loopback: {exposed}"


def test_zz_shutdown_leaves_no_ray_process(ray_session: RaySession) -> None:
    """Runs last: stops the session's Ray through the owning backend."""
    owner = ray_session.ensure()
    procs = _ray_processes(owner)
    tmpdir = owner._process.scratch.path
    assert tmpdir is not None and os.path.isdir(tmpdir)
    ray_session.close()
    alive = [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"Ray processes left after shutdown: {alive}"
    assert not ray.is_initialized()
    assert not os.path.exists(tmpdir), "the temp dir is removed"
    assert "RAY_AUTH_TOKEN_PATH" not in os.environ
    if not ray_session.had_home_token:
        assert not os.path.exists(HOME_TOKEN), "Ray's token stayed in the temp dir"
