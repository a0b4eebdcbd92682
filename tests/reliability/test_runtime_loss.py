"""The runtime disappears while tasks are in flight.

Two tasks run (blocked on a :class:`Gate`), twenty are queued in the runtime and
ten wait on the running ones; then the runtime's central process is SIGKILLed:

* Dask: an external ``dask scheduler`` the backend attached to;
* Ray: the GCS and raylet of a Ray the backend owns, and of one it attached to
  (kept up by another process);
* Parsl: the HighThroughputExecutor's interchange.

Every unfinished future must fail with a clear asyncflow error within a bounded
time, and ``shutdown()`` must still return.  The workflow runs in a fresh
interpreter (``drivers.py runtime-loss``): a runtime that dies can take its
driver with it, and must not take pytest.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from .conftest import external_dask, ray_head, require, run_driver

pytestmark = pytest.mark.timeout(300)

Measure = Callable[[str, str, str, float], None]

#: seconds from the kill until every unfinished future has failed
BOUND = 60.0
#: seconds shutdown() may take afterwards
SHUTDOWN_BOUND = 30.0
#: the driver's progress note once it has killed the runtime
KILLED = "] killed ["
#: what "a clear error" may be: asyncflow's own, naming the task
CLEAR = {"WorkerLostError", "BackendError", "DependencyFailureError"}


def _check(result: dict[str, Any], fault: str, measure: Measure) -> None:
    backend = result["backend"]
    assert result["killed"], "the driver found nothing to kill"
    outcomes: dict[str, list[Any]] = result["outcomes"]
    unfinished = [k for k in outcomes if k not in result["finished_before"]]
    worst = max((outcomes[k][1] for k in unfinished), default=0.0)
    kinds = sorted({outcomes[k][0] for k in unfinished})
    measure(fault, backend, "/".join(kinds) or "nothing pending", worst)
    if result["shutdown_in"] is not None:
        measure(f"{fault}: shutdown()", backend, "returned", result["shutdown_in"])
    assert not result["pending"], (
        f"futures still pending {BOUND:g} s after the kill: {result['pending']}"
    )
    assert worst <= BOUND
    unclear = {k: outcomes[k] for k in unfinished if outcomes[k][0] not in CLEAR}
    assert not unclear, f"not a clear asyncflow error: {unclear}"
    for label in unfinished:
        kind, _, text = outcomes[label]
        if label.startswith("waiting"):
            assert kind == "DependencyFailureError", (label, kind, text)
        else:
            assert "task " in text, f"the error does not name the task: {text}"
    assert result["shutdown_in"] is not None, "shutdown() did not return"
    assert result["shutdown_in"] <= SHUTDOWN_BOUND


def test_dask_scheduler_killed(tmp_path: Path, measure: Measure) -> None:
    require("dask")
    with external_dask(tmp_path) as (address, pid):
        result = run_driver("runtime-loss", "dask", f"{address}@{pid}", timeout=250)
    _check(result, "scheduler killed (attached)", measure)


#: Ray ends a driver that cannot reach the GCS for this long (60 s by default;
#: shortened to keep the suite quick).  The adapter must fail every future and
#: shut down well before that.
RAY_GCS_GRACE = {"RAY_gcs_rpc_server_reconnect_timeout_s": "30"}


def test_ray_head_killed_owned(measure: Measure) -> None:
    require("ray")
    result = run_driver(
        "runtime-loss", "ray", "owned", timeout=250, env=RAY_GCS_GRACE, after=KILLED
    )
    _check(result, "Ray head killed (owned)", measure)


def test_ray_head_killed_attached(measure: Measure) -> None:
    require("ray")
    with ray_head() as (address, pid, auth):
        env = {**RAY_GCS_GRACE, **auth}
        result = run_driver(
            "runtime-loss",
            "ray",
            f"{address}@{pid}",
            timeout=250,
            env=env,
            after=KILLED,
        )
    _check(result, "Ray head killed (attached)", measure)


def test_parsl_interchange_killed(measure: Measure) -> None:
    require("parsl")
    result = run_driver("runtime-loss", "parsl", "interchange", timeout=250)
    _check(result, "HTEX interchange killed", measure)
    after = result["after"]
    assert after["pending"] == 0 and after["kinds"] == ["WorkerLostError"], after
    assert after["dfk_tasks"] == 0, "tasks for a bad executor still go to the DFK"
