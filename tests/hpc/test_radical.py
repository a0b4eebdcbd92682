"""RadicalExecutionBackend from the page's HPC dict: real pilots through Slurm.

Every workflow runs in a driver process on the login node, as a user's would;
the pilot's agent runs on a compute node and reaches the driver only at the
login node's address on the cluster network.  A pilot takes about 20 s to
start on this machine, so each driver checks several things on one pilot:

* three nodes: the page's example, tasks on several nodes, the batch job's
  partition, nodes, time limit and name, a GPU request refused at once;
* two nodes, a one-minute walltime: an MPI task of 4 ranks over both nodes,
  then a task the walltime kills, which must fail naming the walltime;
* one node of two cores: executables run (with ``function_cores=0``; the
  default is refused, see below), then the driver is SIGKILLed and its job
  must leave the queue.

What needs no pilot (impossible requests, the one-node refusal) shares one
driver too.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from asyncflow.adapters.radical._rp import ru
from asyncflow.adapters.radical.batch import config_dir
from asyncflow.adapters.radical.config import plan
from asyncflow.adapters.radical.reaper import working_under

from ..page import hpc_example
from .conftest import Driver
from .slurm import PARTITION, SlurmCluster

ROOT = Path(__file__).resolve().parents[2]
DICT: dict[str, Any] = {
    "resource": "slurm",
    "queue": PARTITION,
    "nodes": 3,
    "cores_per_node": 2,
    "walltime": 10,
}
#: seconds from the driver's SIGKILL until Slurm's queue must be empty
KILL_BOUND = 30.0
HEAD = f"""
import asyncio, json, os, subprocess, sys, time
sys.path.insert(0, {str(ROOT)!r})
from asyncflow import RadicalExecutionBackend, WorkflowEngine
from asyncflow.errors import *
from asyncflow.events import EventKind
T0 = time.monotonic()
def since(t=None):
    return round(time.monotonic() - (T0 if t is None else t), 2)
def node():
    return os.environ.get("SLURMD_NODENAME")
def job_of(backend):
    # the pilot's batch job, as `scontrol show job` describes it
    name = backend.runtime.slurm.job_name
    ids = subprocess.run(["squeue", "-h", "-t", "all", "-n", name, "-o", "%i"],
                         capture_output=True, text=True).stdout.split()
    out = subprocess.run(["scontrol", "-o", "show", "job", ids[0]],
                         capture_output=True, text=True).stdout
    return dict(w.partition("=")[::2] for w in out.split())
"""


#: the page's blocks (@SETUP@, @TASKS@, @LAST@) with checks between them
PAGE_DRIVER = """
import contextlib, io
from tests.page import run_blocks
printed = io.StringIO()
async def main():
    ns = {"__name__": "page"}
    with contextlib.redirect_stdout(printed):
        await run_blocks([@SETUP@], ns)
    backend, flow = ns["backend"], ns["flow"]
    states = []
    flow.subscribe(lambda e: e.kind is EventKind.BACKEND and states.append(e.detail))
    with contextlib.redirect_stdout(printed):
        await run_blocks(@TASKS@, ns)
    where = flow.executable_task(lambda: "echo $SLURMD_NODENAME")
    first = await where()
    first_in = since()
    job = job_of(backend)
    ex = await asyncio.gather(*[where() for _ in range(8)])
    fn = await asyncio.gather(*[flow.function_task(node)() for _ in range(4)])
    t = time.monotonic()
    try:
        await flow.executable_task(resources={"gpus": 1})(lambda: "true")()
        gpu = "ran"
    except ResourceUnavailableError as exc:
        gpu = str(exc)
    gpu_in = since(t)
    t = time.monotonic()
    with contextlib.redirect_stdout(printed):
        await run_blocks([@LAST@], ns)
    rt = backend.runtime
    print(json.dumps({"out": printed.getvalue(), "first": first, "first_in": first_in,
        "job": job, "ex": ex, "fn": fn, "gpu": gpu, "gpu_in": gpu_in,
        "states": states, "last_block": since(t), "timings": rt.timings,
        "proxy": rt.session.cfg.proxy_url, "base": rt.base}))
asyncio.run(main())
"""


def _job_matches(job: dict[str, str], nodes: int, limit: str) -> None:
    assert job["JobName"].startswith("asyncflow-"), job
    assert job["Partition"] == PARTITION, job
    assert job["NumNodes"] == str(nodes), job
    assert job["TimeLimit"] == limit, job
    assert job["JobState"] == "RUNNING", job


@pytest.mark.timeout(120)
def test_impossible_requests_fail_fast_and_one_node_needs_a_choice(
    driver: Driver,
) -> None:
    """No pilot starts: Slurm's reason comes back in seconds, not after the
    session's 20 s; a 1-node, 2-core pilot with raptor is refused at once."""
    out = driver(
        HEAD
        + f"""
async def impossible(**change):
    t = time.monotonic()
    flow = WorkflowEngine(backend=RadicalExecutionBackend({{**{DICT!r}, **change}}))
    try:
        await flow.executable_task(lambda: "true")()
        error = None
    except BackendStartError as exc:
        error = str(exc)
    took = since(t)
    await flow.shutdown()
    return {{"error": error, "took": took, "with_shutdown": since(t)}}
def one_node(**kw):
    try:
        RadicalExecutionBackend({{**{DICT!r}, "nodes": 1}}, **kw)
    except TaskDefinitionError as exc:
        return str(exc)
nodes5 = asyncio.run(impossible(nodes=5))
partition = asyncio.run(impossible(queue="nope"))
print(json.dumps({{"nodes5": nodes5, "partition": partition,
                  "one_node": one_node(), "one_node_1": one_node(function_cores=1)}}))
""",
        timeout=100,
    )
    for case, reason in (
        ("nodes5", "Requested node configuration is not available"),
        ("partition", "invalid partition specified: nope"),
    ):
        res = out[case]
        assert res["error"] and reason in res["error"], res
        assert "--nodes=" in res["error"] and "sinfo" in res["error"], res
        assert res["took"] < 10, f"{case}: {res['took']} s to fail"
        print(f"{case}: failed in {res['took']} s, shut down {res['with_shutdown']} s")
    for refusal in (out["one_node"], out["one_node_1"]):
        assert "leaving no core for executable tasks" in refusal, refusal
        assert "function_cores=0" in refusal and "'nodes': 2" in refusal, refusal


def test_the_generated_resource_config_sits_beside_the_users_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """RADICAL_CONFIG_USER_DIR hides the user's config directory, so the
    user's files are linked in beside the generated one; the shipped sites
    stay.  (No pilot: radical.pilot's own lookup, on the files written.)"""
    home = tmp_path / "home"
    user = home / ".radical" / "pilot" / "configs"
    user.mkdir(parents=True)
    (user / "resource_mysite.json").write_text(
        json.dumps({"box": {"cores_per_node": 7}})
    )
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("RADICAL_CONFIG_USER_DIR", raising=False)
    alloc = plan({**DICT, "account": "abc"}).allocation
    assert alloc is not None
    assert (alloc.queue, alloc.nodes, alloc.cores_per_node) == (PARTITION, 3, 2)
    assert (alloc.walltime, alloc.account) == (10, "abc")
    monkeypatch.setenv("RADICAL_CONFIG_USER_DIR", config_dir(str(tmp_path), alloc))
    found = ru.Config("radical.pilot.resource", name="*", expand=False)
    assert found["mysite"]["box"]["cores_per_node"] == 7
    ours = found["asyncflow"]["slurm"]
    assert ours["resource_manager"] == "SLURM" and ours["cores_per_node"] == 2
    assert ours["launch_methods"]["order"] == ["SRUN", "FORK"]
    assert ours["default_queue"] == PARTITION
    assert "frontera" in found["tacc"]


@pytest.mark.timeout(300)
def test_page_example_on_three_nodes(driver: Driver, tmp_path: Path) -> None:
    """The page's HPC example with the one line that names the backend, plus
    (before its last block) tasks on several nodes, the batch job as Slurm
    shows it, the queue state reported, and a GPU request refused."""
    setup, *tasks, last = hpc_example("RadicalExecutionBackend", repr(DICT))
    script = (
        PAGE_DRIVER.replace("@SETUP@", repr(setup))
        .replace("@TASKS@", repr(tasks))
        .replace("@LAST@", repr(last))
    )
    out = driver(HEAD + script, timeout=240)
    text = out["out"]
    assert text.count("Starting workflow") == 5, text
    assert text.count("completed at") == 5, text
    assert "Total time running asynchronously is" in text
    _job_matches(out["job"], 3, "00:10:00")
    assert "10.251.0.1" in out["proxy"], "the agent dials the login node's address"
    nodes = {n.strip() for n in out["ex"] + out["fn"]}
    assert len(nodes) >= 2 and nodes <= {"n1", "n2", "n3"}, out
    assert all(n in {"n1", "n2", "n3"} for n in out["fn"]), out["fn"]
    assert "1 GPU(s)" in out["gpu"] and "0 GPU(s)" in out["gpu"], out["gpu"]
    assert out["gpu_in"] < 2, out["gpu_in"]
    assert any("is running on n[1-3]" in s for s in out["states"]), out["states"]
    assert out["timings"]["closed"] < 30, out["timings"]
    assert not os.path.exists(out["base"]), "the runtime's directory is removed"
    print(
        f"3 nodes: first result {out['first_in']} s after the constructor; "
        f"executables on {sorted({n.strip() for n in out['ex']})}, functions on "
        f"{sorted(set(out['fn']))}; last block (5 workflows + shutdown) "
        f"{out['last_block']} s, close {out['timings']['closed']:.1f} s"
    )


@pytest.mark.timeout(300)
def test_mpi_over_two_nodes_then_the_walltime_ends_the_pilot(driver: Driver) -> None:
    """4 ranks as one srun step over both nodes of the job; then the job's
    one-minute walltime kills a running task, which fails with WorkerLostError
    naming the walltime, as does a task submitted afterwards; shutdown returns."""
    alloc = {**DICT, "nodes": 2, "walltime": 1, "account": "abc"}
    out = driver(
        HEAD
        + f"""
from datetime import datetime
async def main():
    backend = RadicalExecutionBackend({alloc!r}, function_cores=0)
    flow = WorkflowEngine(backend=backend)
    mpi = flow.executable_task(resources={{"ranks": 4}})(
        lambda: "echo $SLURM_PROCID $SLURMD_NODENAME")
    ranks = await mpi()
    first_in = since()
    job = job_of(backend)
    held = flow.executable_task(lambda: "sleep 300")
    try:
        await held()
        error = None
    except Exception as exc:
        error = [type(exc).__name__, str(exc)]
    ended = time.time()
    started = datetime.fromisoformat(job["StartTime"]).timestamp()
    killed = datetime.fromisoformat(job_of(backend)["EndTime"]).timestamp()
    t = time.monotonic()
    try:
        await held()
        late = None
    except Exception as exc:
        late = [type(exc).__name__, str(exc)]
    late_in = since(t)
    t = time.monotonic()
    await flow.shutdown()
    print(json.dumps({{"ranks": ranks, "first_in": first_in, "job": job,
        "error": error, "after_walltime": round(ended - started - 60, 1),
        "after_kill": round(ended - killed, 1),
        "late": late, "late_in": late_in, "shutdown": since(t)}}))
asyncio.run(main())
""",
        timeout=260,
    )
    lines = sorted(out["ranks"].split("\n"))
    ranks = [line.split() for line in lines if line.strip()]
    assert sorted(r for r, _ in ranks) == ["0", "1", "2", "3"], out["ranks"]
    assert len({n for _, n in ranks}) == 2, out["ranks"]
    _job_matches(out["job"], 2, "00:01:00")
    assert out["job"]["Account"] == "abc", out["job"]
    for kind, text in (out["error"], out["late"]):
        assert kind == "WorkerLostError", (kind, text)
        assert "walltime" in text and "task '" in text, text
    assert out["after_kill"] < 15, "BatchJobs polls squeue every 2 s"
    assert out["late_in"] < 2, out["late_in"]
    assert out["shutdown"] < 30, out["shutdown"]
    print(
        f"2 nodes: MPI result {out['first_in']} s after the constructor; the held "
        f"task failed {out['after_walltime']} s after the walltime's end, "
        f"{out['after_kill']} s after Slurm ended the job: "
        f"{out['error'][1]!r}; shutdown {out['shutdown']} s"
    )


@pytest.mark.timeout(200)
def test_one_node_runs_then_a_killed_driver_leaves_no_job(
    slurm: SlurmCluster, tmp_path: Path
) -> None:
    """One node of two cores runs executables when raptor is left out; a
    SIGKILLed driver's job leaves the queue (BatchJobs' guard), and nothing of
    the pilot keeps running (the adapter's watchdog)."""
    script = tmp_path / "killed.py"
    script.write_text(
        textwrap.dedent(HEAD)
        + f"""
async def main():
    backend = RadicalExecutionBackend({{**{DICT!r}, "nodes": 1}}, function_cores=0)
    flow = WorkflowEngine(backend=backend)
    where = flow.executable_task(lambda: "echo $SLURMD_NODENAME")
    held = flow.executable_task(lambda: "sleep 300")()
    first = (await where()).strip()
    print(json.dumps({{"first": first, "first_in": since(),
                      "base": backend.runtime.base}}), flush=True)
    await held
asyncio.run(main())
"""
    )
    proc = slurm.popen(
        [sys.executable, str(script)], stdout=-1, stderr=-1, cwd=str(tmp_path)
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip(), f"no result from the driver: {_rest(proc)}"
        ready = json.loads(line)
        assert ready["first"] in {"n1", "n2", "n3"}, ready
        assert len(slurm.jobs()) == 1, slurm.jobs()
        os.killpg(proc.pid, signal.SIGKILL)
        t0 = time.monotonic()
        left = slurm.wait_no_jobs(KILL_BOUND)
        took = time.monotonic() - t0
        assert not left, f"still queued {took:.1f} s after SIGKILL: {left}"
        deadline = time.monotonic() + 15
        while working_under([ready["base"]]) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not working_under([ready["base"]]), "the pilot's processes are gone"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
    print(
        f"1 node: first result {ready['first_in']} s after the constructor; "
        f"queue empty {took:.1f} s after SIGKILL"
    )


def _rest(proc: Any) -> str:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    out, err = proc.communicate()
    return f"--- stdout\n{out[-3000:]}\n--- stderr\n{err[-5000:]}"
