"""A driver that is interrupted or killed leaves no batch job behind.

The page warns: "Always call ``await flow.shutdown()`` to properly release HPC
resources and prevent job queue issues."  Users do not always get the chance:
they press Ctrl-C, the login node's session is killed (SIGTERM), or the OOM
killer takes the driver (SIGKILL).  For each batch runtime and each way of
ending, a workflow with a command running on a node is stopped, and the queue
must be empty within :data:`BOUND` seconds.
"""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from .slurm import SlurmCluster

#: seconds from the signal until Slurm's queue is empty (stated in the README)
BOUND = 30.0

DRIVER = """
import asyncio, sys
from asyncflow import WorkflowEngine
from asyncflow.adapters.{module} import {cls}

ALLOCATION = {{"resource": "slurm", "queue": "debug", "nodes": 2,
              "cores_per_node": 2, "walltime": 10}}


def one():
    return 1


async def main():
    flow = WorkflowEngine(backend={cls}(ALLOCATION))

    @flow.executable_task
    def hold():
        return ["sleep", "300"]

    held = hold()
    await flow.function_task(one)()
    print("ready", flush=True)
    await held


if __name__ == "__main__":
    asyncio.run(main())
"""

pytestmark = pytest.mark.timeout(400)

RUNTIMES = {
    "dask": ("dask", "DaskExecutionBackend", 120),
    "parsl": ("parsl", "ParslExecutionBackend", 120),
    "radical": ("radical", "RadicalExecutionBackend", 240),
}


@pytest.mark.parametrize(
    "sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=lambda s: s.name
)
@pytest.mark.parametrize("runtime", list(RUNTIMES))
def test_no_job_survives_the_driver(
    slurm: SlurmCluster, tmp_path: Path, runtime: str, sig: signal.Signals
) -> None:
    module, cls, start_timeout = RUNTIMES[runtime]
    script = tmp_path / "held.py"
    script.write_text(textwrap.dedent(DRIVER.format(module=module, cls=cls)))
    proc = slurm.popen(
        [sys.executable, str(script)], cwd=str(tmp_path), stdout=-1, stderr=-1
    )
    try:
        assert proc.stdout is not None
        line = _readline(proc, start_timeout)
        assert line == "ready", f"driver did not start: {line!r}\n{_rest(proc)}"
        assert slurm.jobs(), "the workflow runs, so its jobs are in the queue"
        t0 = time.monotonic()
        # Ctrl-C reaches the terminal's whole foreground group; so does this
        os.killpg(proc.pid, sig)
        left = slurm.wait_no_jobs(BOUND)
        took = time.monotonic() - t0
        assert not left, (
            f"{sig.name}: still queued after {took:.1f} s: {left}\n"
            f"{slurm.log_tail(40)}\n{_rest(proc)}"
        )
        proc.wait(BOUND)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
    print(f"{runtime} {sig.name}: queue empty {took:.1f} s after the signal")


def _readline(proc: subprocess.Popen[str], timeout: float) -> str:
    """The driver's first line, or '' if it printed none within ``timeout``."""
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            return ""
    return proc.stdout.readline().strip()


def _rest(proc: subprocess.Popen[str]) -> str:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    out, err = proc.communicate()
    return f"--- stdout\n{out[-3000:]}\n--- stderr\n{err[-5000:]}"
