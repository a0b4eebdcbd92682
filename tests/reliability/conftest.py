"""Shared fixtures for the reliability suite: one runtime per backend kind and
module, process-tree bookkeeping, and a table of measured times to failure.

Backends: ``threads``, ``processes``, ``dask``, ``ray``, ``parsl``.  A runtime that
is not installed skips its tests with the extra to install.  Every runtime runs 2
workers on loopback, and every fixture shuts down what it started.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil
import pytest

from asyncflow import ConcurrentExecutionBackend, ExecutionBackend, WorkflowEngine
from asyncflow.conformance import Gate
from asyncflow.conformance import tasks as t

BACKENDS = ("threads", "processes", "dask", "ray", "parsl")
#: backend name -> (module that must import, extra that installs it)
RUNTIMES = {
    "dask": ("distributed", "dask"),
    "ray": ("ray", "ray"),
    "parsl": ("parsl", "parsl"),
    # Not in BACKENDS: a pilot per test would take hours (see test_radical.py).
    # The adapter's module, which imports radical.pilot with its import-time
    # ResourceWarning silenced (this suite turns warnings into errors).
    "radical": ("asyncflow.adapters.radical", "radical"),
}
LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}
#: Environment variable carried by every process a test's runtime starts.
MARK = "ASYNCFLOW_RELIABILITY_MARK"
BIN = Path(sys.executable).parent


def require(name: str) -> None:
    """Skip unless the runtime under backend ``name`` is installed."""
    if name in RUNTIMES:
        module, extra = RUNTIMES[name]
        pytest.importorskip(
            module,
            reason=f"the {name} runtime is not installed: "
            f"pip install 'asyncflow[{extra}]'",
        )


# -- fresh backends, owning their runtime (what a user gets by default) -----------
def owned_backend(name: str) -> ExecutionBackend:
    """The backend ``name`` with its defaults and 2 workers, owning its runtime."""
    require(name)
    if name == "threads":
        return ConcurrentExecutionBackend(ThreadPoolExecutor(2))
    if name == "processes":
        return ConcurrentExecutionBackend(ProcessPoolExecutor(2))
    if name == "dask":
        from asyncflow.adapters.dask import DaskExecutionBackend

        return DaskExecutionBackend()  # 2 single-thread worker processes
    if name == "ray":
        from asyncflow.adapters.ray import RayExecutionBackend

        return RayExecutionBackend(num_cpus=2)
    if name == "parsl":
        from asyncflow.adapters.parsl import ParslExecutionBackend

        return ParslExecutionBackend(max_workers=2)
    raise AssertionError(name)


# -- one runtime per module, each test attaching a fresh backend ------------------
class Runtime:
    """A runtime shared by a module's tests; :meth:`backend` attaches a new
    backend to it (the engine's shutdown leaves the runtime running)."""

    #: whether a dead worker takes only its own task down (a process pool breaks
    #: as a whole: every task in it fails with the dead worker)
    isolates_workers = True

    def __init__(self, name: str):
        self.name = name

    def backend(self) -> ExecutionBackend:
        return owned_backend(self.name)

    def close(self) -> None:
        pass


class _DaskRuntime(Runtime):
    def __init__(self) -> None:
        super().__init__("dask")
        import dask
        from distributed import LocalCluster

        # What DaskExecutionBackend() configures for the cluster it owns.
        with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
            self.cluster = LocalCluster(
                n_workers=2,
                threads_per_worker=1,
                processes=True,
                host="127.0.0.1",
                dashboard_address=None,
                scheduler_kwargs={
                    "dashboard_address": "127.0.0.1:0",
                    "dashboard": False,
                },
            )

    def backend(self) -> ExecutionBackend:
        from asyncflow.adapters.dask import DaskExecutionBackend

        return DaskExecutionBackend(self.cluster.scheduler_address)

    def close(self) -> None:
        self.cluster.close()


class _NullSink:
    def set_result(self, uid: str, value: Any) -> None: ...
    def set_exception(self, uid: str, exc: BaseException) -> None: ...
    def set_running(self, uid: str) -> None: ...


class _RayRuntime(Runtime):
    def __init__(self) -> None:
        super().__init__("ray")
        from asyncflow import BackendStartError
        from asyncflow.adapters.ray import RayExecutionBackend

        for attempt in range(2):
            owner = RayExecutionBackend(num_cpus=2)
            try:
                asyncio.run(owner.start(_NullSink()))
                break
            except BackendStartError:  # a loaded 2-core box can miss Ray's 30 s
                asyncio.run(owner.shutdown())
                if attempt:
                    raise
        self.owner = owner

    def backend(self) -> ExecutionBackend:
        from asyncflow.adapters.ray import RayExecutionBackend

        return RayExecutionBackend(address=self.owner.address)

    def close(self) -> None:
        asyncio.run(self.owner.shutdown())


class _ParslRuntime(Runtime):
    def __init__(self, run_dir: Path) -> None:
        super().__init__("parsl")
        from parsl.dataflow.dflow import DataFlowKernel

        from asyncflow.adapters.parsl import local_htex_config

        self.dfk = DataFlowKernel(local_htex_config(str(run_dir / "runinfo")))
        try:
            wait_for_htex_workers(self.dfk)
        except BaseException:
            self.dfk.cleanup()
            raise

    def backend(self) -> ExecutionBackend:
        from asyncflow.adapters.parsl import ParslExecutionBackend

        return ParslExecutionBackend(self.dfk)

    def close(self) -> None:
        self.dfk.cleanup()


class _ProcessRuntime(Runtime):
    isolates_workers = False


def wait_for_htex_workers(dfk: Any, n: int = 2, timeout: float = 120) -> None:
    from parsl.executors import HighThroughputExecutor

    deadline = time.monotonic() + timeout
    for ex in dfk.executors.values():
        if isinstance(ex, HighThroughputExecutor):
            while sum(m["worker_count"] for m in ex.connected_managers()) < n:
                assert not ex.bad_state_is_set, ex.executor_exception
                assert time.monotonic() < deadline, "HTEX workers never connected"
                time.sleep(0.05)


async def warm(backend: ExecutionBackend, workers: int = 2) -> None:
    """Run one task on every worker at once, so every worker exists."""
    flow = WorkflowEngine(backend)
    try:
        async with Gate() as gate:
            gate.barrier("warm", workers)
            wait = flow.function_task(t.gate_wait)
            got = asyncio.gather(
                *(wait(gate.address, "warm", 60) for _ in range(workers))
            )
            assert await asyncio.wait_for(got, 120) == ["go"] * workers
    finally:
        await flow.shutdown()


@pytest.fixture(scope="module")
def runtime(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Runtime]:
    """Use with ``@pytest.mark.parametrize("runtime", [...], indirect=True)``."""
    name: str = request.param
    require(name)
    rt: Runtime
    if name == "dask":
        rt = _DaskRuntime()
    elif name == "ray":
        rt = _RayRuntime()
    elif name == "parsl":
        rt = _ParslRuntime(tmp_path_factory.mktemp("parsl"))
    elif name == "processes":
        rt = _ProcessRuntime(name)
    else:
        rt = Runtime(name)
    try:
        asyncio.run(warm(rt.backend()))
        yield rt
    finally:
        rt.close()


# -- processes, threads and temp dirs ------------------------------------------------
#: Helpers multiprocessing starts once per interpreter and keeps for its life;
#: this process's own belong to no backend (and killing its resource tracker
#: makes Python warn later).
_INTERPRETER_GLOBAL = ("multiprocessing.resource_tracker", "multiprocessing.forkserver")


def _interpreter_global(proc: psutil.Process, me: int) -> bool:
    cmd = " ".join(proc.cmdline())
    return proc.ppid() == me and any(g in cmd for g in _INTERPRETER_GLOBAL)


def marked_processes(
    token: str, before: frozenset[int] = frozenset()
) -> list[psutil.Process]:
    """Every live process a runtime started since ``before`` was taken: those
    whose environment has ``MARK=token`` (they inherit it, even when re-parented
    to init), this process's new descendants (processes that rename themselves
    with setproctitle hide their environment), and the children of all those."""
    found: dict[int, psutil.Process] = {}
    me = os.getpid()
    roots: list[psutil.Process] = []
    for proc in psutil.process_iter():
        if proc.pid == me:
            continue
        with contextlib.suppress(psutil.Error, OSError):
            if proc.environ().get(MARK) == token:
                roots.append(proc)
    with contextlib.suppress(psutil.Error):
        roots.extend(
            p
            for p in psutil.Process(me).children(recursive=True)
            if p.pid not in before
        )
    mine = {me, *(p.pid for p in psutil.Process(me).parents())}
    for proc in roots:
        with contextlib.suppress(psutil.Error, OSError):
            if proc.pid in found or proc.pid in mine or _interpreter_global(proc, me):
                continue
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            found[proc.pid] = proc
            for child in proc.children(recursive=True):
                if child.pid not in mine:
                    found.setdefault(child.pid, child)
    return list(found.values())


class Tracker:
    """Finds the processes started since it was made (see marked_processes)."""

    def __init__(self, token: str):
        self.token = token
        self.before = frozenset(
            p.pid for p in psutil.Process().children(recursive=True)
        )

    def processes(self) -> list[psutil.Process]:
        return marked_processes(self.token, self.before)


def describe(procs: list[psutil.Process]) -> list[str]:
    out = []
    for p in procs:
        with contextlib.suppress(psutil.Error):
            out.append(f"{p.pid} {p.name()} {' '.join(p.cmdline())[:120]}")
    return out


def kill_all(procs: list[psutil.Process]) -> None:
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(procs, timeout=10)


@pytest.fixture
def tracker(monkeypatch: pytest.MonkeyPatch) -> Iterator[Tracker]:
    """A fresh marker in this process's environment, so that every process a
    runtime starts during the test can be found; whatever is left is killed
    afterwards (after the test's own assertions)."""
    token = uuid.uuid4().hex
    monkeypatch.setenv(MARK, token)
    found = Tracker(token)
    yield found
    kill_all(found.processes())


# -- subprocess drivers ---------------------------------------------------------------
DRIVERS = Path(__file__).with_name("drivers.py")


class DriverDied(AssertionError):
    """The driver process ended without reporting (a runtime took it down)."""


def run_driver(
    *args: str,
    timeout: float,
    env: dict[str, str] | None = None,
    after: str | None = None,
    script: Path = DRIVERS,
    prefix: Sequence[str] = (),
    cwd: str | None = None,
) -> dict[str, Any]:
    """Run ``drivers.py ARGS`` (or ``script``) in a fresh interpreter and return
    its JSON line; kill whatever it left running afterwards (after recording it).
    ``prefix`` goes in front of the command (a Slurm login node's ``nsenter``);
    ``cwd`` is where it runs (Slurm's tools write there).

    A driver that ends without a report raises :class:`DriverDied` if it had
    written ``after`` (a progress note: the fault was injected), and a plain
    RuntimeError otherwise (it failed before the point under test)."""
    token = uuid.uuid4().hex
    full_env = {
        **os.environ,
        MARK: token,
        "RAY_USAGE_STATS_ENABLED": "0",
        **(env or {}),
    }
    before = frozenset(p.pid for p in psutil.Process().children(recursive=True))
    try:
        out = subprocess.run(
            [*prefix, sys.executable, str(script), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=full_env,
            cwd=cwd,
        )
    finally:
        left = marked_processes(token, before)
        kill_all(left)
    lines = out.stdout.strip().splitlines()
    if out.returncode != 0 or not lines:
        text = (
            f"driver {args} exited {out.returncode}:\n{out.stdout[-2000:]}\n"
            f"{out.stderr[-4000:]}"
        )
        if after is not None and after not in out.stderr:
            raise RuntimeError(f"before {after!r}: {text}")
        raise DriverDied(text)
    result: dict[str, Any] = json.loads(lines[-1])
    result["left_after_exit"] = describe(left)
    result["stderr"] = out.stderr[-4000:]
    return result


# -- external runtimes ----------------------------------------------------------------
@contextlib.contextmanager
def external_dask(tmp: Path) -> Iterator[tuple[str, int]]:
    """``dask scheduler`` and two ``dask worker`` processes on 127.0.0.1, each in
    a session of its own; yields the scheduler's address and pid."""
    from distributed import Client

    sched_file = tmp / "scheduler.json"
    procs: list[subprocess.Popen[bytes]] = []

    def spawn(*argv: str, log: str) -> subprocess.Popen[bytes]:
        with open(tmp / log, "wb") as out:
            proc = subprocess.Popen(
                [str(BIN / "dask"), *argv],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=tmp,
            )
        procs.append(proc)
        return proc

    try:
        scheduler = spawn(
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
        deadline = time.monotonic() + 120
        address = None
        while address is None:
            if scheduler.poll() is not None or time.monotonic() > deadline:
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
        with Client(address, timeout=120) as client:
            client.wait_for_workers(2, timeout=120)
        yield address, scheduler.pid
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
        for p in procs:
            p.wait()


@contextlib.contextmanager
def ray_head() -> Iterator[tuple[str, int, dict[str, str]]]:
    """A local Ray kept up by another process (``drivers.py ray-head``), for
    drivers that attach to it; yields its address, that process's pid and the
    environment an attaching driver needs (Ray's auth token settings)."""
    token = uuid.uuid4().hex
    tracker = Tracker(token)
    with tempfile.TemporaryFile("w+") as errors:
        keeper = subprocess.Popen(
            [sys.executable, str(DRIVERS), "ray-head", "ray"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=errors,
            text=True,
            env={**os.environ, MARK: token, "RAY_USAGE_STATS_ENABLED": "0"},
        )
        assert keeper.stdin is not None and keeper.stdout is not None
        with keeper.stdin, keeper.stdout:
            try:
                line = keeper.stdout.readline()
                if not line:
                    keeper.wait()
                    errors.seek(0)
                    raise AssertionError(
                        "the Ray head keeper exited before Ray was up:\n"
                        + errors.read()[-3000:]
                    )
                info = json.loads(line)
                yield info["address"], keeper.pid, info["auth"]
            finally:
                with contextlib.suppress(OSError):
                    keeper.stdin.close()  # the keeper shuts its Ray down
                try:
                    keeper.wait(30)
                except subprocess.TimeoutExpired:
                    keeper.kill()
                    keeper.wait()
                kill_all(tracker.processes())


# -- the table of measured outcomes ---------------------------------------------------
MEASURED = "asyncflow_measured"


@pytest.fixture
def measure(request: pytest.FixtureRequest) -> Callable[[str, str, str, float], None]:
    """``measure(fault, backend, outcome, seconds)``: a row of the summary table."""

    def record(fault: str, backend: str, outcome: str, seconds: float) -> None:
        request.node.user_properties.append(
            (MEASURED, (fault, backend, outcome, round(seconds, 2)))
        )

    return record


_rows: list[tuple[str, str, str, float]] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when == "call":
        _rows.extend(v for k, v in report.user_properties if k == MEASURED)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _rows:
        return
    tr = terminalreporter
    tr.section("reliability: fault x backend -> outcome (measured)")
    for fault, backend, outcome, seconds in sorted(_rows):
        tr.line(f"{fault:<34} {backend:<10} {outcome:<44} {seconds:>7.2f} s")
