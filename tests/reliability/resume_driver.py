"""A 200-task workflow on a result store, for ``test_store_resume.py``.

``python resume_driver.py BACKEND STORE MARKS`` runs 40 chains of 5 tasks
(each hop's value depends on the one before), writes one file in MARKS per
task body that actually runs, prints ``done N`` as tasks finish, and the sum of
the chain ends as its last line.  Each hop takes 20 ms, so a driver killed
halfway has stored about half the tasks.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
import uuid
from pathlib import Path

from asyncflow import WorkflowEngine

sys.path.insert(0, str(Path(__file__).parent))
from drivers import owned


def hop(marks: str, chain: int, step: int, before: int) -> int:
    open(os.path.join(marks, f"{chain}-{step}-{uuid.uuid4().hex}"), "w").close()
    time.sleep(0.02)
    return before * 3 + chain + step  # drivers.uninterrupted() computes the same


async def main(backend: str, store: str, marks: str) -> None:
    async with WorkflowEngine(owned(backend), store=store) as flow:
        task = flow.function_task(chunk=False)(hop)
        ends = []
        for chain in range(40):
            value = task(marks, chain, 0, 1)
            for step in range(1, 5):
                value = task(marks, chain, step, value)
            ends.append(value)
        done = 0
        for fut in asyncio.as_completed(ends):
            await fut
            done += 5
            print(f"done {done}", flush=True)
        print(sum([f.result() for f in ends]), flush=True)


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:4]))
    sys.stdout.flush()
    os._exit(0)  # whatever the runtime left must not keep the driver alive
