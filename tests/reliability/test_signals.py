"""SIGINT and SIGTERM to a running workflow leave nothing running, on every
backend: both to ``python wf.py`` and to ``asyncflow run wf.py --backend X``.

The workflow holds a running function (blocked on a :class:`Gate`) and a running
executable (``sleep 301.25``, in a session of its own, as in ``tests/test_cli``).
On threads the function gives up after 5 s: a thread cannot be stopped, and the
process cannot exit while it runs (the README's "abandoned").
Every process of the run carries a marker in its environment, so the whole tree
can be found afterwards, even processes re-parented to init.  ``tests/test_cli``
checks the held command after ``asyncflow run`` on threads and processes; these
tests check the whole process tree, on every backend and for both entry points.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from asyncflow.conformance import Gate
from tests.test_cli import _held_processes

from .conftest import BACKENDS, MARK, Tracker, describe, kill_all, require
from .drivers import wait_gone

pytestmark = pytest.mark.timeout(240)

Measure = Callable[[str, str, str, float], None]

SCRIPT = textwrap.dedent("""
    import asyncio, sys
    from asyncflow import WorkflowEngine
    from asyncflow.conformance import tasks as t

    async def main():
        flow = WorkflowEngine()
        fifo, host, port, hold_for = sys.argv[1:5]

        @flow.executable_task
        def hold(fifo):
            return f"echo up > {fifo}; exec sleep 301.25"

        wait = flow.function_task(t.gate_wait)
        queued = [flow.function_task(t.inc)(i) for i in range(10)]
        held = wait((host, int(port)), "fn", int(hold_for))
        await asyncio.gather(hold(fifo), held, *queued)

    if __name__ == "__main__":
        asyncio.run(main())
""")

#: seconds the process tree may take to go away after the workflow process exits
GRACE = 10.0

SIGNALS = [
    pytest.param(signal.SIGINT, id="SIGINT"),
    pytest.param(signal.SIGTERM, id="SIGTERM"),
]


def _command(how: str, backend: str, script: Path) -> list[str]:
    if how == "script":
        return [sys.executable, str(script)]
    return [sys.executable, "-m", "asyncflow", "run", "--backend", backend, str(script)]


@pytest.mark.parametrize("sig", SIGNALS)
@pytest.mark.parametrize("how", ["script", "cli"])
@pytest.mark.parametrize("backend", BACKENDS)
async def test_signal_leaves_nothing_running(
    tmp_path: Path,
    backend: str,
    how: str,
    sig: signal.Signals,
    measure: Measure,
) -> None:
    require(backend)
    script = tmp_path / "wf.py"
    script.write_text(SCRIPT)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    token = uuid.uuid4().hex
    tracker = Tracker(token)  # this run's processes, not other tests' runtimes
    env = {
        **os.environ,
        MARK: token,
        "ASYNCFLOW_BACKEND": backend,
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    if backend in ("threads", "processes"):
        env["ASYNCFLOW_BACKEND_OPTIONS"] = json.dumps({"max_workers": 2})
    async with Gate() as gate:
        host, port = gate.address
        # Files, not pipes: orphaned children would hold a pipe open.
        log = tmp_path / "output.txt"
        with open(log, "w") as out:
            proc = subprocess.Popen(
                [
                    *_command(how, backend, script),
                    *(
                        str(fifo),
                        host,
                        str(port),
                        "5" if backend == "threads" else "300",
                    ),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=tmp_path,
            )
        try:

            def read_fifo() -> str:
                with open(fifo) as f:  # returns once the command wrote "up"
                    return f.read()

            reader = asyncio.ensure_future(asyncio.to_thread(read_fifo))
            await asyncio.wait_for(gate.arrived("fn"), 150)
            assert (await asyncio.wait_for(reader, 60)).strip() == "up"
            tree = tracker.processes()
            ours = {p.pid for p in tree}  # not another run's "sleep 301.25"
            held = [p for p in _held_processes() if p.pid in ours]
            assert held, "the held command is running"
            assert len(tree) >= 2, describe(tree)
            begin = time.monotonic()
            proc.send_signal(sig)
            try:
                await asyncio.to_thread(proc.wait, 60)
            except subprocess.TimeoutExpired:
                raise AssertionError(
                    f"still running 60 s after {signal.Signals(sig).name}:\n"
                    + log.read_text()[-3000:]
                ) from None
            # The held command first: nothing kills it later if it outlived the
            # run (its session is its own), so there is no point waiting long.
            left = await asyncio.to_thread(wait_gone, held, 3.0)
            if not left:
                rest = [p for p in tree if p.pid not in {h.pid for h in held}]
                left = await asyncio.to_thread(wait_gone, rest, GRACE)
            took = time.monotonic() - begin
            left_names = describe(left)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            kill_all(tracker.processes())
    err = log.read_text()
    name = signal.Signals(sig).name
    measure(
        f"{name} to {'python wf.py' if how == 'script' else 'asyncflow run'}",
        backend,
        "tree gone" if not left else f"{len(left)} process(es) left",
        took,
    )
    if how == "cli":
        assert proc.returncode == 128 + sig, err[-3000:]
    assert not left, f"left running after {name}: {left_names}\n{err[-2000:]}"


GC_SCRIPT = textwrap.dedent("""
    import gc, sys, time

    def slow(phase, info):  # like distributed's GC diagnosis callback, only slower
        if phase == "start":
            open(sys.argv[1], "w").close()
            time.sleep(3)

    gc.callbacks.append(slow)
    gc.collect()
    gc.callbacks.remove(slow)
    print("still running after SIGTERM")
""")


def test_sigterm_during_a_gc_callback_still_stops_asyncflow_run(
    tmp_path: Path,
) -> None:
    script = tmp_path / "gc_wf.py"
    script.write_text(GC_SCRIPT)
    entered = tmp_path / "entered"
    proc = subprocess.Popen(
        [sys.executable, "-m", "asyncflow", "run", str(script), str(entered)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not entered.exists():
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() < deadline, "the gc callback never ran"
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 143, f"exit {proc.returncode}: {out[-2000:]}"
