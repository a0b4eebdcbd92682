"""Shutdown under load: 1,000 tasks, two running and the rest queued in the
runtime or waiting on the running ones.  ``shutdown()`` returns within 10 s, every
future is done, and no process, thread or temp dir of the backend remains.

Each backend owns a fresh runtime with its defaults (2 workers), in a fresh
interpreter (``drivers.py shutdown``) with a marker in its environment and a
private ``TMPDIR``, so that everything it starts can be found afterwards, even
processes re-parented to init; the driver counts its own threads.  The running
tasks block on a :class:`Gate`; on threads they give up after 4 s, because a
thread cannot be stopped from outside and shutdown waits for it.  A second
scenario shuts down with one executable running (in a session of its own).

The scenario runs once per backend (a module-scoped fixture); each promise is a
test of its own so that a failure names exactly which one is broken.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from .conftest import BACKENDS, require, run_driver

pytestmark = pytest.mark.timeout(240)
per_backend = pytest.mark.parametrize("outcome", BACKENDS, indirect=True)

Measure = Callable[[str, str, str, float], None]

#: Threads that runtimes start once per interpreter and keep for its life; they
#: belong to no backend.
GLOBAL_THREADS = ("Dask-Offload",)  # distributed's process-wide offload executor


@pytest.fixture(scope="module")
def outcome(request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
    name: str = request.param
    require(name)
    tmp = tempfile.mkdtemp(prefix="afr-", dir="/tmp")  # short: Ray's unix sockets
    try:
        yield run_driver("shutdown", name, timeout=200, env={"TMPDIR": tmp})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@per_backend
def test_shutdown_returns_within_10s(outcome: dict[str, Any], measure: Measure) -> None:
    took = outcome["returned_in"]
    measure(
        "shutdown, 1000 tasks in flight",
        outcome["backend"],
        "returned" if took is not None else "did NOT return within 10 s",
        took if took is not None else 10.0,
    )
    assert took is not None, f"shutdown() took over 10 s on {outcome['backend']}"


@per_backend
def test_every_future_is_done(outcome: dict[str, Any]) -> None:
    assert outcome["futures"] == 1000
    assert outcome["done"] == 1000
    assert outcome["cancelled"] >= 998, "only the running tasks may end otherwise"


@per_backend
def test_no_process_remains(outcome: dict[str, Any]) -> None:
    if outcome["backend"] not in ("threads", "processes"):
        assert outcome["during"], "found no process of the runtime while it ran"
    assert not outcome["processes_left"], outcome["processes_left"]


@per_backend
def test_no_thread_remains(outcome: dict[str, Any]) -> None:
    left = [n for n in outcome["threads_left"] if not n.startswith(GLOBAL_THREADS)]
    assert not left, left


@per_backend
def test_no_temp_file_remains(outcome: dict[str, Any]) -> None:
    assert not outcome["files_left"], outcome["files_left"]


@pytest.mark.parametrize("name", BACKENDS)
def test_shutdown_kills_a_running_executable(
    name: str, request: pytest.FixtureRequest, measure: Measure
) -> None:
    require(name)
    tmp = tempfile.mkdtemp(prefix="afr-", dir="/tmp")
    try:
        result = run_driver("shutdown-command", name, timeout=200, env={"TMPDIR": tmp})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    took = result["returned_in"]
    measure(
        "shutdown, executable running",
        name,
        "killed" if not result["processes_left"] else "command left running",
        took if took is not None else 10.0,
    )
    assert took is not None, "shutdown() took over 10 s"
    assert result["cancelled"] == 1
    assert not result["processes_left"], result["processes_left"]


def test_ray_completion_after_shutdown_touches_no_ray() -> None:
    require("ray")
    result = run_driver(
        "ray-late-completion", "ray", timeout=200, after="now the late completions"
    )
    assert result["reported"], "no task was in flight"
    assert not result["calls_after_shutdown"], result["calls_after_shutdown"][0]
