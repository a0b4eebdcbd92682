"""Chaos on Slurm: the reliability suite's chaos workflow, on the backends a user
gets from the page's HPC dict.

``tests/reliability/chaos.py`` runs on the login node with ``ASYNCFLOW_BACKEND``
and ``ASYNCFLOW_HPC`` set, as ``asyncflow run --backend NAME --hpc ...`` would:
5,000 mixed tasks on two emulated nodes while a random worker process inside a
batch job is SIGKILLed every 0.3-1.5 s (once 50 more tasks have ended), and, at
three quarters, one whole job is SIGKILLed by Slurm as when its node fails.  The
same endings are allowed as on a single machine; no task may end wrong or stay
pending, no process of the run may outlive it, and the queue must be empty
afterwards (the conftest's check).

A Parsl worker pool is a victim only while another one is left: the last one is
its block's job, which the head kill takes.  On radical.pilot the victims are
the processes running function tasks inside the pilot's job, found by the
pilot's sandbox (Slurm starts them without the run's marker), and the head kill
is the pilot's job.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest

from ..reliability.conftest import require, run_driver
from .slurm import PARTITION, SlurmCluster

CHAOS = Path(__file__).parents[1] / "reliability" / "chaos.py"
TASKS = 5000
HPC = {
    "resource": "slurm",
    "queue": PARTITION,
    "nodes": 2,
    "cores_per_node": 2,
    "walltime": 30,
}


@pytest.mark.timeout(1600)
@pytest.mark.parametrize("name", ["dask", "parsl", "radical"])
def test_chaos_on_slurm(name: str, slurm: SlurmCluster) -> None:
    require(name)
    with (
        tempfile.TemporaryDirectory(prefix="af-chaos-") as tmp,
        tempfile.TemporaryDirectory(prefix="af-chaos-cwd-") as cwd,
    ):
        got = run_driver(
            name,
            str(TASKS),
            "7",
            script=CHAOS,
            timeout=1550,
            env={
                **slurm.env,
                "TMPDIR": tmp,
                "ASYNCFLOW_BACKEND": name,
                "ASYNCFLOW_HPC": json.dumps(HPC),
            },
            prefix=slurm.nsenter(),
            cwd=cwd,
        )
    endings = ", ".join(f"{k} {v}" for k, v in sorted(got["outcomes"].items()))
    print(
        f"chaos on Slurm, {name}: {got['tasks']} tasks, {got['kills']} kills "
        f"({'; '.join(got['heads']) or 'no job'}), {endings}, "
        f"drained in {got['drain_s']} s"
    )
    print(got)
    assert got["tasks"] >= TASKS
    assert not got["outcomes"].get("wrong"), got
    assert not got["outcomes"].get("pending"), got
    assert got["processes_left"] == [] and got["files_left"] == [], got
    assert got["heads"] and got["kills"] > len(got["heads"]), got
