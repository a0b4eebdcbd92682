"""Service tasks on the embedded backends: up, used, and stopped at shutdown.

The conformance suite's ServiceTests run the same promise on every adapter;
these cover what is the engine's alone (refusals, failures before up, the
difference REPORTS_RUNNING makes)."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor

import pytest

from asyncflow import (
    ConcurrentExecutionBackend,
    DependencyFailureError,
    ResourceUnavailableError,
    TaskDefinitionError,
    WorkflowEngine,
)
from asyncflow.adapters.concurrent import process_backend
from asyncflow.services import Service

pytestmark = pytest.mark.timeout(60)


def threads(n: int) -> ConcurrentExecutionBackend:
    return ConcurrentExecutionBackend(ThreadPoolExecutor(n))


def test_services_need_a_backend_that_can_stop_them() -> None:
    flow = WorkflowEngine(threads(1))
    with pytest.raises(TaskDefinitionError, match="could not stop it at shutdown"):
        flow.function_task(service=True)(print)
    with pytest.raises(TaskDefinitionError, match="service=True is for function"):
        flow.block(service=True)(print)
    with pytest.raises(TaskDefinitionError, match="True or False"):
        flow.executable_task(service="yes")(print)
    asyncio.run(flow.shutdown())


def test_a_service_refused_by_its_backend_fails_with_its_dependents() -> None:
    async def main() -> None:
        async with WorkflowEngine(process_backend(1)) as flow:
            serve = flow.executable_task(service=True, resources={"cores": 64})(
                lambda: "sleep 300"
            )
            use = flow.function_task(print)
            service = serve()
            with pytest.raises(ResourceUnavailableError):
                await service
            with pytest.raises(DependencyFailureError):
                await use(service)

    asyncio.run(main())


def test_a_service_ending_after_it_is_up_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main() -> None:
        async with WorkflowEngine(threads(1)) as flow:
            serve = flow.executable_task(service=True)(lambda: "exit 3")
            assert isinstance(await serve(), Service)
            # one thread: this runs, and is reported, after the command ended
            assert await flow.function_task(lambda: 1)() == 1

    with caplog.at_level(logging.WARNING, logger="asyncflow"):
        asyncio.run(main())
    assert "failed while up" in caplog.text
