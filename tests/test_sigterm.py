"""The engine's SIGTERM handling (asyncflow/_signals.py), in this process.

End-to-end signals to scripts and ``asyncflow run`` are in
``tests/reliability/test_signals.py``; these check the pieces.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import threading
from typing import Any

import pytest

from asyncflow import WorkflowEngine

pytestmark = pytest.mark.timeout(60)


def _wait_for_sigterm(ready: Any) -> None:
    ready.set()
    while True:
        signal.pause()


@pytest.mark.skipif(
    threading.current_thread() is not threading.main_thread(),
    reason="signal handlers need the main thread",
)
async def test_forked_child_gets_default_sigterm_back() -> None:
    """A forked child (a process-pool worker) must not inherit the loop's
    handler: SIGTERM would neither end it nor stay out of this process."""
    if signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        pytest.skip("SIGTERM is handled by someone else in this process")
    flow = WorkflowEngine()
    try:
        assert await flow.function_task(lambda: 1)() == 1  # bound: handler on
        ctx = multiprocessing.get_context("fork")
        ready = ctx.Event()
        child = ctx.Process(target=_wait_for_sigterm, args=(ready,))
        child.start()
        try:
            assert await asyncio.to_thread(ready.wait, 30), "the child never ran"
            os.kill(child.pid, signal.SIGTERM)  # type: ignore[arg-type]
            await asyncio.to_thread(child.join, 30)
            assert child.exitcode == -signal.SIGTERM, child.exitcode
        finally:
            if child.is_alive():
                child.kill()
                child.join()
        # This process got nothing: the loop still runs and the engine works.
        assert await flow.function_task(lambda: 2)() == 2
    finally:
        await flow.shutdown()
        loop = asyncio.get_running_loop()
        loop.remove_signal_handler(signal.SIGTERM)
