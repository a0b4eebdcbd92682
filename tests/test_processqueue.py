"""The process pool's queue: chunks of short tasks and chains fused into them
must keep every task's own outcome (see ``adapters/toolkit/chunks.py``)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import pytest

from asyncflow import (
    ConcurrentExecutionBackend,
    DependencyFailureError,
    SerializationError,
    WorkflowEngine,
)

pytestmark = pytest.mark.timeout(120)


def inc(x: int) -> int:
    return x + 1


def picky(i: int) -> Any:
    if i == 50:
        raise ValueError(f"task {i} fails")
    if i == 60:
        return threading.Lock()  # cannot travel back
    return i * 2


def hop(x: int, i: int, box: dict[str, list[int]]) -> int:
    if i == 50:
        raise ValueError("hop 50 fails")
    return x + box["step"][0]


@pytest.fixture
async def flow() -> AsyncIterator[WorkflowEngine]:
    async with WorkflowEngine(
        ConcurrentExecutionBackend(ProcessPoolExecutor(2))
    ) as engine:
        warm = engine.function_task(inc)
        # The queue sizes chunks from measured run times: measure some first.
        assert await asyncio.gather(*(warm(i) for i in range(20))) == list(range(1, 21))
        yield engine


async def test_chunk_mates_keep_their_own_outcomes(flow: WorkflowEngine) -> None:
    task = flow.function_task(picky)
    futures = [task(i) for i in range(400)]
    outcomes = await asyncio.gather(*futures, return_exceptions=True)
    for i, outcome in enumerate(outcomes):
        if i == 50:
            assert isinstance(outcome, ValueError)
        elif i == 60:
            assert isinstance(outcome, SerializationError)
            assert "picky" in str(outcome) and "pickled" in str(outcome)
        else:
            assert outcome == i * 2


async def test_a_failure_inside_a_fused_chain(flow: WorkflowEngine) -> None:
    task = flow.function_task(hop)
    box = {"step": [2]}
    x: Any = 0
    futures = []
    for i in range(100):
        x = task(x, i, box)
        futures.append(x)
    outcomes = await asyncio.gather(*futures, return_exceptions=True)
    assert outcomes[:50] == [2 * (i + 1) for i in range(50)]
    assert isinstance(outcomes[50], ValueError)
    for later in outcomes[51:]:
        assert isinstance(later, DependencyFailureError)


async def test_a_long_chain_returns_every_hop(flow: WorkflowEngine) -> None:
    task = flow.function_task(inc)
    x: Any = 0
    futures = []
    for _ in range(2000):
        x = task(x)
        futures.append(x)
    assert await asyncio.gather(*futures) == list(range(1, 2001))


async def test_an_unpicklable_argument_fails_its_task_at_once(
    flow: WorkflowEngine,
) -> None:
    task = flow.function_task(inc)
    with pytest.raises(SerializationError, match="'inc'.*cannot be pickled"):
        await asyncio.wait_for(task(threading.Lock()), 10)
    assert await task(1) == 2


def nap(seconds: float) -> float:
    import time

    time.sleep(seconds)
    return seconds


@pytest.mark.parametrize("attempt", range(5))
async def test_a_command_started_while_the_pool_forks_returns(attempt: int) -> None:
    """A pool worker forked while a command's Popen had its pipes open used to
    hold them, so the command's caller waited for that worker to exit."""
    async with WorkflowEngine(
        ConcurrentExecutionBackend(ProcessPoolExecutor(2))
    ) as flow:
        busy = [flow.function_task(nap)(30) for _ in range(2)]  # forks the workers
        said = flow.executable_task(lambda: ["echo", "hi"])()
        assert (await asyncio.wait_for(said, 15)).strip() == "hi"
        for f in busy:
            f.cancel()


async def test_a_recursion_error_comes_back_after_distributed_is_imported() -> None:
    """distributed installs tblib's reducer for every exception, which pickles the
    traceback too: a RecursionError's 1,000 frames then overflowed pickle."""
    pytest.importorskip("distributed")
    from asyncflow.conformance import tasks as t

    async with WorkflowEngine(
        ConcurrentExecutionBackend(ProcessPoolExecutor(2))
    ) as flow:
        with pytest.raises(RecursionError):
            await asyncio.wait_for(flow.function_task(t.recurse)(0), 60)
