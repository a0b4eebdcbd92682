"""Scripts moved from radical.asyncflow by changing their imports only.

They build backends with ``await Backend(...)``, ``await Backend.create(...)`` or
``async with``, and import every backend's name at the top even when this machine
lacks its runtime.  Each runtime here is a real one, kept to one worker.
"""

from __future__ import annotations

import inspect
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor

import pytest

from asyncflow import (
    AsyncflowError,
    ConcurrentExecutionBackend,
    WorkflowEngine,
)
from asyncflow.adapters._awaitable import AwaitableBackend
from asyncflow.checks import protocol_gaps
from asyncflow.conformance import tasks as t

pytestmark = pytest.mark.timeout(120)

ADAPTERS = {
    "concurrent": ("asyncflow.adapters.concurrent", "ConcurrentExecutionBackend"),
    "dask": ("asyncflow.adapters.dask", "DaskExecutionBackend"),
    "ray": ("asyncflow.adapters.ray", "RayExecutionBackend"),
    "parsl": ("asyncflow.adapters.parsl", "ParslExecutionBackend"),
    "radical": ("asyncflow.adapters.radical", "RadicalExecutionBackend"),
}


async def _runs_a_task(backend: object) -> None:
    """One real task through an engine on ``backend``, which the engine then
    shuts down."""
    flow = WorkflowEngine(backend=backend)
    try:
        assert await flow.function_task(t.inc)(1) == 2
    finally:
        await flow.shutdown()


def _executor_is_shut_down(executor: ThreadPoolExecutor) -> bool:
    try:
        executor.submit(int).result()
    except RuntimeError:
        return True
    return False


@pytest.mark.parametrize("name", sorted(ADAPTERS))
def test_every_adapter_has_the_awaitable_forms(name: str) -> None:
    module, cls_name = ADAPTERS[name]
    cls = getattr(pytest.importorskip(module), cls_name)
    assert issubclass(cls, AwaitableBackend)
    for member in ("__await__", "create", "__aenter__", "__aexit__"):
        owner = next(k for k in cls.__mro__ if member in vars(k))
        assert owner is AwaitableBackend, (member, owner)
    assert inspect.iscoroutinefunction(cls.create)
    # the mixin sits last: the adapter's own protocol members win
    assert cls.__mro__[-2] is AwaitableBackend
    assert protocol_gaps(cls) == []


async def test_await_backend_returns_the_backend() -> None:
    executor = ThreadPoolExecutor(max_workers=2)
    backend = ConcurrentExecutionBackend(executor)
    try:
        assert await backend is backend
    finally:
        await backend.shutdown()
    assert _executor_is_shut_down(executor)


async def test_awaited_constructor_runs_a_task() -> None:
    backend = await ConcurrentExecutionBackend(ThreadPoolExecutor())
    assert isinstance(backend, ConcurrentExecutionBackend)
    await _runs_a_task(backend)


async def test_create_runs_a_task() -> None:
    executor = ThreadPoolExecutor(max_workers=2)
    backend = await ConcurrentExecutionBackend.create(executor, shutdown_executor=False)
    try:
        assert isinstance(backend, ConcurrentExecutionBackend)
        await _runs_a_task(backend)
        assert not _executor_is_shut_down(executor), "shutdown_executor was lost"
    finally:
        executor.shutdown()


async def test_async_with_shuts_the_backend_down() -> None:
    executor = ThreadPoolExecutor(max_workers=2)
    flow: WorkflowEngine | None = None
    try:
        async with ConcurrentExecutionBackend(executor) as backend:
            assert isinstance(backend, ConcurrentExecutionBackend)
            flow = WorkflowEngine(backend=backend)
            assert await flow.function_task(t.inc)(1) == 2
            assert not _executor_is_shut_down(executor)
        assert _executor_is_shut_down(executor)
        later = WorkflowEngine(backend=backend)
        try:
            with pytest.raises(AsyncflowError, match="shut down"):
                await later.function_task(t.inc)(1)
        finally:
            await later.shutdown()
    finally:
        if flow is not None:
            await flow.shutdown()
        executor.shutdown()


async def test_async_with_shuts_down_when_the_body_raises() -> None:
    executor = ThreadPoolExecutor(max_workers=1)
    try:
        with pytest.raises(ValueError, match="body"):
            async with ConcurrentExecutionBackend(executor):
                raise ValueError("body")
        assert _executor_is_shut_down(executor)
    finally:
        executor.shutdown()


async def test_dask_create_runs_a_task() -> None:
    dask = pytest.importorskip("asyncflow.adapters.dask")
    backend = await dask.DaskExecutionBackend.create(
        # the scheduler's HTTP server on an ephemeral loopback port, as in
        # tests/adapters/test_dask.py: a taken 8787 warns
        n_workers=1,
        scheduler_kwargs={"dashboard_address": "127.0.0.1:0", "dashboard": False},
    )
    assert isinstance(backend, dask.DaskExecutionBackend)
    await _runs_a_task(backend)


@pytest.mark.timeout(180)
async def test_ray_create_runs_a_task() -> None:
    ray = pytest.importorskip("asyncflow.adapters.ray")
    backend = await ray.RayExecutionBackend.create(num_cpus=1)
    assert isinstance(backend, ray.RayExecutionBackend)
    await _runs_a_task(backend)


async def test_parsl_create_runs_a_task() -> None:
    parsl = pytest.importorskip("asyncflow.adapters.parsl")
    backend = await parsl.ParslExecutionBackend.create(max_workers=1)
    assert isinstance(backend, parsl.ParslExecutionBackend)
    await _runs_a_task(backend)


@pytest.mark.parametrize(
    ("runtime", "cls_name", "extra"),
    [
        ("radical.pilot", "RadicalExecutionBackend", "radical"),
        ("ray", "RayExecutionBackend", "ray"),
    ],
)
def test_missing_runtime_imports_and_fails_when_built(
    runtime: str, cls_name: str, extra: str
) -> None:
    code = textwrap.dedent(
        f"""
        import asyncio, sys
        sys.modules[{runtime!r}] = None
        from asyncflow import {cls_name} as B, BackendNotInstalledError
        assert B.__name__ == {cls_name!r}, B
        for build in (B, lambda: asyncio.run(B.create())):
            try:
                build()
            except BackendNotInstalledError as exc:
                print(exc)
            else:
                sys.exit("built without its runtime")
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 2, out.stdout
    for line in lines:
        assert f"pip install 'asyncflow[{extra}]'" in line


def test_installed_runtime_gives_the_real_class() -> None:
    import asyncflow

    module, cls_name = ADAPTERS["dask"]
    real = getattr(pytest.importorskip(module), cls_name)
    assert asyncflow.DaskExecutionBackend is real
