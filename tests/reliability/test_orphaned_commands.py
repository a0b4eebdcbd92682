"""A command whose worker was SIGKILLed does not outlive ``shutdown()``.

An executable runs in a session of its own, so that a kill reaches everything it
spawned; the price is that nothing stops it when the process that started it
dies.  The worker's own clean-up never runs after a SIGKILL (Dask's nanny sends
one to a worker that is slow to close), so the backend that owns the runtime
must still find the command.  The command reports its pid and its parent's (the
worker) through a fifo; the test kills the worker, shuts the engine down, and
looks for the command and its output files.

``processes`` is not here: its commands run under the driver itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import tempfile
from pathlib import Path

import psutil
import pytest

from asyncflow import WorkerLostError, WorkflowEngine

from .conftest import owned_backend
from .drivers import describe, wait_gone

pytestmark = pytest.mark.timeout(180)


@pytest.mark.parametrize("name", ["dask", "ray", "parsl"])
async def test_command_of_a_killed_worker_is_gone_after_shutdown(
    name: str, tmp_path: Path
) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)

    def read_fifo() -> str:
        with open(fifo) as f:
            return f.read()

    command: psutil.Process | None = None
    try:
        async with WorkflowEngine(owned_backend(name)) as flow:

            @flow.executable_task
            def hold(path: str) -> str:
                return f"echo $$ $PPID > {path}; exec sleep 302.5"

            reader = asyncio.ensure_future(asyncio.to_thread(read_fifo))
            held = hold(str(fifo))
            pid, worker = map(int, (await asyncio.wait_for(reader, 120)).split())
            command = psutil.Process(pid)
            assert worker != os.getpid(), "the command runs in a worker process"
            os.kill(worker, signal.SIGKILL)
            with pytest.raises(WorkerLostError, match="hold"):
                await asyncio.wait_for(held, 60)
        left = await asyncio.to_thread(wait_gone, [command], 5.0)
        assert not left, f"still running after shutdown: {describe(left)}"
        # nor its output files, which its worker would have removed
        files = list(Path(tempfile.gettempdir()).glob(f"{held.uid}-*"))
        assert not files, f"left behind: {files}"
    finally:
        if command is not None:  # the test failed: don't leave it behind
            with contextlib.suppress(psutil.Error):
                command.kill()
