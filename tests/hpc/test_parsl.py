"""ParslExecutionBackend from the page's HPC dict, on the Slurm test cluster.

Every workflow runs in a driver process on the login node, as a user's would:
the compute nodes reach it only at its address on the cluster network.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from ..page import hpc_example
from .conftest import Driver
from .slurm import PARTITION, SlurmCluster

ROOT = Path(__file__).resolve().parents[2]
DICT = {
    "resource": "slurm",
    "queue": PARTITION,
    "nodes": 3,
    "cores_per_node": 2,
    "walltime": 10,
}
HEAD = f"""
import asyncio, json, os, sys, time
sys.path.insert(0, {str(ROOT)!r})
from asyncflow import ParslExecutionBackend, WorkflowEngine
from asyncflow.errors import ResourceUnavailableError
from asyncflow.events import EventKind
T0 = time.monotonic()
def since(t=None):
    return round(time.monotonic() - (T0 if t is None else t), 2)
"""


def _left_behind(path: Path) -> list[str]:
    return [p.name for p in path.iterdir() if p.name.startswith(".asyncflow-parsl")]


@pytest.mark.timeout(120)
def test_page_hpc_example_runs_on_slurm(driver: Driver, tmp_path: Path) -> None:
    """The page's HPC example, with the one line that names the backend."""
    sources = hpc_example("ParslExecutionBackend", repr(DICT))
    out = driver(
        HEAD
        + f"""
import contextlib, io
from tests.page import run_blocks
printed = io.StringIO()
with contextlib.redirect_stdout(printed):
    asyncio.run(run_blocks({sources!r}, {{"__name__": "page"}}))
print(json.dumps({{"out": printed.getvalue(), "took": since()}}))
""",
        timeout=100,
    )
    text = out["out"]
    assert text.count("Starting workflow") == 5, text
    done = re.findall(r"^Workflow (\d) completed at", text, flags=re.M)
    assert sorted(done) == ["0", "1", "2", "3", "4"], text
    assert "Total time running asynchronously is" in text
    assert _left_behind(tmp_path) == []
    print(f"page example on 3 nodes: {out['took']} s from the constructor to the end")


MEET = """
import glob, uuid
def meet(where, n):
    # Three tasks at once need two nodes of two workers each.
    os.makedirs(where, exist_ok=True)
    open(os.path.join(where, uuid.uuid4().hex), "w").close()
    deadline = time.monotonic() + 90
    while not os.path.exists(os.path.join(where, "go")):
        if time.monotonic() > deadline:
            raise TimeoutError("the test never said go")
        time.sleep(0.05)
    return os.environ["SLURMD_NODENAME"]
"""


@pytest.mark.timeout(150)
def test_tasks_spread_over_nodes_of_the_requested_job(
    slurm: SlurmCluster, tmp_path: Path
) -> None:
    meet = tmp_path / "meet"
    script = tmp_path / "nodes.py"
    script.write_text(
        textwrap.dedent(HEAD)
        + MEET
        + textwrap.dedent(
            f"""
async def main():
    backend = ParslExecutionBackend({DICT!r})
    flow = WorkflowEngine(backend=backend)
    try:
        gpu = flow.function_task(resources={{"gpus": 1}})(meet)
        t = time.monotonic()
        try:
            await gpu({str(meet)!r}, 0)
            refused = "ran"
        except ResourceUnavailableError as exc:
            refused = str(exc)
        refused_in = since(t)
        task = flow.function_task(meet)
        first = since()
        nodes = await asyncio.gather(*[task({str(meet)!r}, 3) for _ in range(6)])
    finally:
        t = time.monotonic()
        await flow.shutdown()
    print(json.dumps({{"nodes": nodes, "refused": refused, "refused_in": refused_in,
                      "shutdown": since(t), "total": since()}}))
asyncio.run(main())
"""
        )
    )
    proc = slurm.popen(
        [sys.executable, str(script)], stdout=-1, stderr=-1, cwd=str(tmp_path)
    )
    try:
        t0 = time.monotonic()
        while len(list(meet.glob("*"))) < 3:  # three tasks running at once
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() - t0 < 90, "three tasks never ran at once"
            time.sleep(0.1)
        running = time.monotonic() - t0
        (job,) = [j for j in slurm.jobs() if j["name"].startswith("asyncflow-")]
        seen = slurm.scontrol_job(job["id"])
        (meet / "go").touch()
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 0, err[-4000:]
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    assert seen["JobState"] == "RUNNING", seen
    assert seen["Partition"] == PARTITION
    assert seen["NumNodes"] == "3", seen
    assert seen["TimeLimit"] == "00:10:00", seen
    asked = (job["partition"], job["nodes"], job["timelimit"])
    assert asked == (PARTITION, "3", "10:00"), job
    assert len(set(result["nodes"])) >= 2, result["nodes"]
    assert "task 'meet'" in result["refused"], result["refused"]
    assert "gpus_per_node" in result["refused"], result["refused"]
    assert result["refused_in"] < 30  # the backend start, not a job, bounds it
    assert _left_behind(tmp_path) == []
    print(
        f"3 at once {running:.1f} s after launch; nodes {sorted(result['nodes'])}; "
        f"shutdown {result['shutdown']} s"
    )


@pytest.mark.timeout(90)
def test_an_impossible_request_fails_at_once_with_slurms_reason(
    driver: Driver, tmp_path: Path
) -> None:
    out = driver(
        HEAD
        + f"""
async def attempt(**change):
    t = time.monotonic()
    flow = WorkflowEngine(backend=ParslExecutionBackend({{**{DICT!r}, **change}}))
    @flow.executable_task
    async def date():
        return "/bin/date"
    try:
        await date()
        task_error = None
    except Exception as exc:
        task_error = [type(exc).__name__, str(exc)]
    try:
        await flow.start()
        start_error = None
    except Exception as exc:
        start_error = [type(exc).__name__, str(exc)]
    await flow.shutdown()
    return {{"task": task_error, "start": start_error, "took": since(t)}}
async def main():
    return {{"nodes": await attempt(nodes=5), "queue": await attempt(queue="nope")}}
print(json.dumps(asyncio.run(main())))
""",
        timeout=60,
    )
    reasons = {
        "nodes": "Requested node configuration is not available",
        "queue": "invalid partition specified: nope",
    }
    for key, reason in reasons.items():
        got = out[key]
        assert got["task"] is not None and got["task"][0] == "BackendStartError", got
        assert got["start"] == got["task"], got
        assert reason in got["task"][1], got
        assert got["took"] < 15, got
    assert _left_behind(tmp_path) == []
    print(f"refused in {out['nodes']['took']} s (nodes) / {out['queue']['took']} s")
    print(out["nodes"]["task"][1])


@pytest.mark.timeout(170)
def test_walltime_expiry_fails_every_unfinished_task(
    driver: Driver, tmp_path: Path
) -> None:
    out = driver(
        HEAD
        + f"""
def nap():
    time.sleep(600)
async def main():
    flow = WorkflowEngine(backend=ParslExecutionBackend(
        {{**{DICT!r}, "nodes": 1, "walltime": 1}}))
    task = flow.function_task(nap)
    results = await asyncio.gather(*[task() for _ in range(3)], return_exceptions=True)
    failed_at = since()
    t = time.monotonic()
    try:
        await task()
        later = None
    except Exception as exc:
        later = [type(exc).__name__, str(exc), since(t)]
    t = time.monotonic()
    await flow.shutdown()
    print(json.dumps({{"errors": [[type(r).__name__, str(r)] for r in results],
                      "failed_at": failed_at, "later": later, "shutdown": since(t)}}))
asyncio.run(main())
""",
        timeout=160,
    )
    assert len(out["errors"]) == 3
    for kind, message in out["errors"]:
        assert kind == "WorkerLostError", out
        assert "task 'nap'" in message and "walltime" in message, message
    later = out["later"]
    assert later[0] == "WorkerLostError" and "walltime" in later[1], later
    assert later[2] < 5, later
    assert out["shutdown"] < 40, out
    assert _left_behind(tmp_path) == []
    print(f"failed {out['failed_at']} s after start; shutdown {out['shutdown']} s")
    print(out["errors"][0][1])


@pytest.mark.timeout(120)
def test_a_job_waiting_in_the_queue_shows_as_queued(
    slurm: SlurmCluster, driver: Driver
) -> None:
    res = slurm.run(["sbatch", "--parsable", "-N3", "--wrap", "sleep 300"])
    assert res.returncode == 0, res.stderr
    blocker = res.stdout.strip().split(";")[0]
    try:
        out = driver(
            HEAD
            + f"""
import subprocess
def where():
    return os.environ["SLURMD_NODENAME"]
async def main():
    flow = WorkflowEngine(backend=ParslExecutionBackend({DICT!r}))
    events = []
    async def watch():
        async for ev in flow.events():
            if ev.kind is EventKind.BACKEND:
                events.append([ev.name, ev.detail, since()])
                if ev.name == "queued":  # make room: the job should start now
                    subprocess.run(["scancel", {blocker!r}], check=True)
    watcher = asyncio.ensure_future(watch())
    node = await asyncio.wait_for(flow.function_task(where)(), 90)
    await flow.shutdown()
    watcher.cancel()
    print(json.dumps({{"events": events, "node": node, "took": since()}}))
asyncio.run(main())
""",
            timeout=110,
        )
    finally:
        slurm.run(["scancel", blocker])
    states = [name for name, _, _ in out["events"]]
    assert "queued" in states and "running" in states, out["events"]
    assert states.index("queued") < states.index("running"), out["events"]
    (queued,) = [d for n, d, _ in out["events"] if n == "queued"]
    assert "waiting in the queue" in queued, queued
    assert out["node"].startswith("n")
    print(out["events"])
