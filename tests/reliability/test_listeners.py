"""Socket audit: every backend started with its defaults listens on loopback only.

For each backend the test lists the listening TCP sockets of this process and
of every process the backend started (found through an environment marker, and
as this process's new descendants).  Listeners this process already had before
the backend started (other tests' runtimes, in a full run) are not the backend's.

The 0.0.0.0 listener earlier runs found inside the pytest process is Dask's: a
worker living in the driver process (``processes=False``, as in
``tests/adapters/test_dask.py``'s threads cluster) starts its HTTP server (metrics,
health; ``worker_dashboard_address=None`` does not stop it) on every interface,
because its inproc address names no host to bind to.  The adapter pins it to
127.0.0.1; the last test keeps it there.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import psutil
import pytest

from asyncflow import ExecutionBackend, WorkflowEngine
from asyncflow.conformance import tasks as t

from .conftest import BACKENDS, LOOPBACK, Tracker, owned_backend, require

pytestmark = pytest.mark.timeout(180)

Listener = tuple[int, str, str, int]  # pid, process name, address, port


def _listening(procs: list[psutil.Process]) -> set[Listener]:
    found = set()
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            name = proc.name()
            for conn in proc.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN:
                    found.add((proc.pid, name, conn.laddr.ip, conn.laddr.port))
    return found


async def _audit(backend: ExecutionBackend, tracker: Tracker) -> set[Listener]:
    me = psutil.Process()
    before = _listening([me])
    flow = WorkflowEngine(backend)
    try:
        await flow.start()
        inc = flow.function_task(t.inc)
        assert sum(await asyncio.gather(inc(1), inc(2))) == 5
        assert await flow.executable_task(lambda: ["true"])() == ""
        # A forked worker inherits the sockets this process already had (other
        # tests' runtimes, in a full run): those are not the backend's.
        had = {(ip, port) for _, _, ip, port in before}
        now = _listening([me, *tracker.processes()])
        return {entry for entry in now if (entry[2], entry[3]) not in had}
    finally:
        await flow.shutdown()


def _check(name: str, listening: set[Listener]) -> None:
    exposed = sorted(entry for entry in listening if entry[2] not in LOOPBACK)
    assert not exposed, f"{name} listens beyond loopback: {exposed}"


@pytest.mark.parametrize("name", BACKENDS)
async def test_default_backend_listens_on_loopback_only(
    name: str, tracker: Tracker, record_property: Any
) -> None:
    require(name)
    listening = await _audit(owned_backend(name), tracker)
    record_property("listeners", sorted(listening))
    if name in ("threads", "processes"):
        assert not listening, f"{name} should open no socket: {listening}"
    else:
        assert listening, f"found no listening socket of {name} at all"
    _check(name, listening)


async def test_dask_in_process_workers_listen_on_loopback_only(
    tracker: Tracker,
) -> None:
    require("dask")
    from asyncflow.adapters.dask import DaskExecutionBackend

    backend = DaskExecutionBackend(n_workers=1, threads_per_worker=2, processes=False)
    _check("DaskExecutionBackend(processes=False)", await _audit(backend, tracker))
