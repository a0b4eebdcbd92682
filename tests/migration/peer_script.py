# ruff: noqa: B006  (radical.asyncflow declares task_description as a dict default)
"""A workflow as radical.asyncflow users write it; the test changes only its
imports (``radical.asyncflow`` -> ``asyncflow``) before running it."""

import asyncio
import logging
import os
import sys
from concurrent.futures import ThreadPoolExecutor

from radical.asyncflow import (
    ConcurrentExecutionBackend,
    InputFile,
    OutputFile,
    WorkflowEngine,
)
from radical.asyncflow.errors import DependencyFailureError
from radical.asyncflow.logging import init_default_logger

logger = init_default_logger(logging.WARNING)
workdir = sys.argv[1]


async def main():
    backend = await ConcurrentExecutionBackend(ThreadPoolExecutor())
    flow = await WorkflowEngine.create(backend=backend)

    @flow.function_task
    async def prepare(task_description={"ranks": 1, "cores_per_rank": 1}):
        return 21

    @flow.function_task
    async def double(x, task_description={"environment": {"UNIT": "none"}}):
        return x * 2

    @flow.executable_task
    async def write(value, out, task_description={"environment": {"WHO": "rp"}}):
        return f"echo $WHO {value} > {out}"

    @flow.executable_task
    async def read(src):
        return f"cat {src}"

    @flow.function_task
    async def fail():
        raise ValueError("planned")

    @flow.function_task
    async def after(x):
        return x

    @flow.block
    async def pipeline(n):
        value = await double(prepare(), task_description={"cores_per_rank": 1})
        path = os.path.join(workdir, f"out{n}.txt")
        write(value, OutputFile(path))
        return await read(InputFile(path))

    results = await asyncio.gather(*(pipeline(i) for i in range(3)))
    print("results", [r.strip() for r in results])

    try:
        await after(fail())
    except DependencyFailureError as e:
        print("root cause", repr(e.root_cause), e.failed_dependencies)

    try:
        await flow.executable_task(lambda: "exit 4")()
    except RuntimeError as e:
        print("failed command", type(e).__name__)

    await flow.shutdown(skip_execution_backend=False)


asyncio.run(main())
