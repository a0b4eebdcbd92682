"""The reference page's workflow, run as written on the embedded default.

The page's one-line switch: the ``ConcurrentExecutionBackend(ThreadPoolExecutor())``
line from its "Local Execution" block takes the place of the HPC backend line.
Everything else is the page's own code, with only the import changed.
"""

from __future__ import annotations

import threading

import pytest

from .page import block_with, run_blocks

pytestmark = pytest.mark.timeout(120)


async def test_page_workflow_runs_on_threads(
    capsys: pytest.CaptureFixture[str],
) -> None:
    before = {th.ident for th in threading.enumerate()}
    local = block_with("ConcurrentExecutionBackend(ThreadPoolExecutor())")
    setup = block_with("flow = WorkflowEngine(backend=backend)")
    setup = "\n".join(
        line for line in setup.splitlines() if "RadicalExecutionBackend" not in line
    )
    tasks = block_with("@flow.executable_task")
    workflow = block_with("async def run_wf")
    execute = block_with("asyncio.gather(*[run_wf(i)")
    namespace: dict[str, object] = {"__name__": "page"}
    await run_blocks([local, setup, tasks, workflow, execute], namespace)
    out = capsys.readouterr().out
    assert out.count("Starting workflow") == 5
    assert sorted(
        line.split()[1]
        for line in out.splitlines()
        if line.endswith(tuple("0123456789")) and "completed" in line
    ) == ["0", "1", "2", "3", "4"]
    assert "Total time running asynchronously is" in out
    left = [th.name for th in threading.enumerate() if th.ident not in before]
    assert not left, f"threads left after flow.shutdown(): {left}"
