"""Durable runs on every backend: a 200-task workflow on a result store whose
driver (with everything it started: its process group, and every process
carrying the run's marker) is SIGKILLed halfway, then run again.

The re-run must run only the tasks whose results had not been stored (a task
running at the kill runs again), give the same answer as an uninterrupted run
(computed here from the same function), and find the store consistent
(SQLite's integrity check, every result readable).  radical.pilot is here too,
on a local pilot per driver: two pilots, a few minutes.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from asyncflow.store import MISS, ResultStore

from .conftest import BACKENDS, MARK, Tracker, kill_all, require
from .drivers import uninterrupted

pytestmark = pytest.mark.timeout(600)

DRIVER = Path(__file__).with_name("resume_driver.py")


def run(cmd: list[str], env: dict[str, str]) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.splitlines()[-1]


def kill_halfway(cmd: list[str], env: dict[str, str], found: Tracker) -> None:
    with subprocess.Popen(
        cmd, stdout=subprocess.PIPE, text=True, start_new_session=True, env=env
    ) as first:
        assert first.stdout is not None
        for line in first.stdout:
            if line.startswith("done") and int(line.split()[1]) >= 100:
                os.killpg(first.pid, signal.SIGKILL)
                break
        first.wait(30)
    kill_all(found.processes())  # what left the group: pool workers, heads


@pytest.mark.parametrize("name", [*BACKENDS, "radical"])
def test_a_driver_killed_halfway_resumes_where_it_stopped(
    name: str, tmp_path: Path
) -> None:
    require(name)
    token = uuid.uuid4().hex
    # only what this test starts: this process's own children (a session's
    # runtimes) are not to be killed
    found = Tracker(token)
    env = {**os.environ, MARK: token, "RAY_USAGE_STATS_ENABLED": "0"}
    store, marks = tmp_path / "store", tmp_path / "marks"
    marks.mkdir()
    cmd = [sys.executable, str(DRIVER), name, str(store), str(marks)]
    try:
        kill_halfway(cmd, env, found)
        with sqlite3.connect(store / "index.sqlite") as db:
            assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        kept = ResultStore(store)
        stored = len(kept)
        assert 100 <= stored < 200, stored
        assert all(kept.get(r.key) is not MISS for r in kept)
        before = len(os.listdir(marks))
        resumed = run(cmd, env)
        assert len(os.listdir(marks)) - before == 200 - stored  # only the rest
        assert len(ResultStore(store)) == 200
        assert int(resumed) == uninterrupted()
    finally:
        kill_all(found.processes())
