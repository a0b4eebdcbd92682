"""Chaos on every backend: 5,000 mixed tasks while workers are SIGKILLed at
random moments and, where the runtime's head is not the driver itself, the head
once (``chaos.py`` describes the workflow, the kills and the allowed endings).

Every task must end in an allowed way, none may stay pending or end wrong, and
shutdown must leave no process and no file in the run's private temp dir.  The
row for each backend (tasks, kills, endings, time to drain) goes to the
reliability table at the end of the run.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

from .conftest import BACKENDS, require, run_driver

pytestmark = pytest.mark.timeout(960)

CHAOS = Path(__file__).with_name("chaos.py")
TASKS = 5000


@pytest.mark.parametrize(
    "name",
    [
        *BACKENDS,
        # a pilot of its own: 20-95 s to start here, more under load
        pytest.param("radical", marks=pytest.mark.timeout(1900)),
    ],
)
def test_chaos(name: str, measure: Callable[[str, str, str, float], None]) -> None:
    require(name)
    with tempfile.TemporaryDirectory(prefix="af-chaos-") as tmp:
        got = run_driver(
            name,
            str(TASKS),
            "7",
            script=CHAOS,
            timeout=1850 if name == "radical" else 900,
            env={"TMPDIR": tmp},
        )
    endings = got["outcomes"]
    kinds = ", ".join(f"{k} {v}" for k, v in sorted(endings.items()))
    measure(
        f"chaos: {got['kills']} kills" + (" + head" if got["heads"] else ""),
        name,
        kinds[:44],
        got["drain_s"],
    )
    print(got)
    assert got["tasks"] >= TASKS
    assert not endings.get("wrong") and not endings.get("pending"), got
    assert got["processes_left"] == [] and got["files_left"] == [], got
    if name != "threads":  # a thread cannot be killed from outside
        # workers killed at random, not only the head's processes
        assert got["kills"] > len(got["heads"]), got
