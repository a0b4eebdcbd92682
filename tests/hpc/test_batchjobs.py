"""asyncflow.slurm.BatchJobs: queue states reported, no job outlives its driver."""

from __future__ import annotations

import os
import signal
import sys
import textwrap
import time
from pathlib import Path

import pytest

from .conftest import Driver
from .slurm import SlurmCluster

pytestmark = pytest.mark.timeout(120)

SUBMIT = """
import json, subprocess, sys, threading
from asyncflow.slurm import BatchJobs
states, lost = [], []
running, queued = threading.Event(), threading.Event()
def report(state, detail):
    states.append([state, detail])
    (running if state == "running" else queued if state == "queued" else
     threading.Event()).set()
jobs = BatchJobs("test", report=report, lost=lost.append, interval=0.2)
jobs.start()
def sbatch(*opts):
    subprocess.run(["sbatch", "-J", jobs.prefix, "-o", "/dev/null", *opts,
                    "--wrap", "sleep 300"],
                   check=True, capture_output=True)
"""


def test_queue_states_are_reported_and_close_cancels(driver: Driver) -> None:
    out = driver(
        SUBMIT
        + """
sbatch("-N3")
sbatch("-N3")  # waits for the first: every node is taken
assert running.wait(30) and queued.wait(30), states
left = jobs.close()
print(json.dumps({"states": states, "left": [j.id for j in left], "lost": lost}))
"""
    )
    assert out["left"] == [] and out["lost"] == []
    kinds = {state for state, _ in out["states"]}
    assert {"queued", "running"} <= kinds
    queued = [d for s, d in out["states"] if s == "queued"]
    waiting = ("waiting in the queue (Resources)", "waiting in the queue (Priority)")
    assert any(w in d for d in queued for w in waiting), queued


def test_a_job_that_ends_under_the_backend_is_reported_lost(driver: Driver) -> None:
    out = driver(
        SUBMIT
        + """
lost_event = threading.Event()
jobs._lost = lambda message: (lost.append(message), lost_event.set())
sbatch("-N1")
assert running.wait(30), states
job = jobs.jobs()[0].id
subprocess.run(["scancel", job], check=True)
assert lost_event.wait(30), states
jobs.close()
print(json.dumps({"lost": lost, "job": job}))
"""
    )
    assert out["lost"] == [
        f"Slurm job {out['job']} was cancelled outside asyncflow; its workers are gone"
    ]


def test_a_killed_driver_leaves_no_job(slurm: SlurmCluster, tmp_path: Path) -> None:
    script = tmp_path / "killed.py"
    script.write_text(
        textwrap.dedent(SUBMIT)
        + 'sbatch("-N2")\nassert running.wait(30)\nprint("ready", flush=True)\n'
        + "threading.Event().wait()\n"
    )
    proc = slurm.popen([sys.executable, str(script)], stdout=-1, stderr=-1)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready", proc.stderr
        assert len(slurm.jobs()) == 1
        os.killpg(proc.pid, signal.SIGKILL)
        t0 = time.monotonic()
        left = slurm.wait_no_jobs(10)
        took = time.monotonic() - t0
    finally:
        os.killpg(proc.pid, signal.SIGKILL) if proc.poll() is None else None
        proc.communicate()
    assert left == [], f"still queued {took:.1f} s after SIGKILL: {left}"
