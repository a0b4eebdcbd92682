"""The Slurm test cluster, shared by the HPC tests of one pytest session.

The cluster is never skipped: a machine without Slurm fails these tests with
what to install (``ci/setup.sh`` installs it; ``-m 'not hpc'`` deselects them).
Every test ends with an empty queue: a job left behind fails the test that left
it, once the bound below has run out.
"""

from __future__ import annotations

import json
import os
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from .slurm import SlurmCluster, missing

#: seconds a finished workflow's jobs may take to leave the queue
QUEUE_EMPTY_BOUND = 30.0

Driver = Callable[..., dict[str, Any]]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if Path(str(item.fspath)).is_relative_to(here):
            item.add_marker(pytest.mark.hpc)


@pytest.fixture(scope="session")
def slurm() -> Iterator[SlurmCluster]:
    why = missing()
    if why:
        pytest.fail(why, pytrace=False)
    cluster = SlurmCluster().start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(autouse=True)
def _queue_left_empty(slurm: SlurmCluster) -> Iterator[None]:
    yield
    left = slurm.wait_no_jobs(QUEUE_EMPTY_BOUND)
    if left:
        slurm.run(["scancel", "--full", "--user=root"])
        pytest.fail(f"jobs left in the queue {QUEUE_EMPTY_BOUND:.0f} s after: {left}")


@pytest.fixture
def driver(slurm: SlurmCluster, tmp_path: Path) -> Driver:
    """``driver(code, timeout=...)``: run a workflow script on the login node.

    The script prints one JSON document as its last line of stdout, which is
    returned; a non-zero exit fails the test with the script's output.
    """

    def run(code: str, timeout: float = 240, **env: str) -> dict[str, Any]:
        script = tmp_path / "driver.py"
        script.write_text(textwrap.dedent(code))
        res = slurm.run(
            [sys.executable, str(script)],
            timeout=timeout,
            cwd=str(tmp_path),
            env={**slurm.env, **env},
        )
        if res.returncode != 0:
            pytest.fail(
                f"driver exited {res.returncode}\n--- stdout\n{res.stdout[-4000:]}"
                f"\n--- stderr\n{res.stderr[-6000:]}",
                pytrace=False,
            )
        lines = res.stdout.strip().splitlines()
        return json.loads(lines[-1]) if lines else {}

    return run


@pytest.fixture(scope="session")
def venv_bin() -> str:
    return os.path.dirname(sys.executable)
