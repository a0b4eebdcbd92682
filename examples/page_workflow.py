"""The reference page's workflow on the embedded default (a thread pool).

Five workflows run at once; in each, task3 waits for task1 and task2.  To run it
on another runtime, change the one ``backend = ...`` line, for example to
``DaskExecutionBackend()`` or ``RadicalExecutionBackend({'resource':
'local.localhost'})``.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

from asyncflow import ConcurrentExecutionBackend, WorkflowEngine


async def main() -> None:
    backend = ConcurrentExecutionBackend(ThreadPoolExecutor())
    flow = WorkflowEngine(backend=backend)

    @flow.executable_task
    async def task1(*args: str) -> str:
        return "/bin/date"

    @flow.executable_task
    async def task2(*args: str) -> str:
        return "/bin/date"

    @flow.executable_task
    async def task3(*args: str) -> str:
        return "/bin/date"

    async def run_wf(wf_id: int) -> None:
        print(f"Starting workflow {wf_id} at {time.time()}")
        t3 = task3(task1(), task2())
        await t3
        print(f"Workflow {wf_id} completed at {time.time()}")

    start_time = time.time()
    await asyncio.gather(*[run_wf(i) for i in range(5)])
    print(f"\nTotal time running asynchronously is: {time.time() - start_time}")
    await flow.shutdown()


if __name__ == "__main__":
    asyncio.run(main())
