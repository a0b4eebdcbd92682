"""DaskExecutionBackend(<the page's HPC dict>) on the Slurm test cluster.

Every workflow runs as a user's would, on the login node; the backend owns a
dask-jobqueue SLURMCluster of one job per node.  What is checked is what breaks on
a real cluster: workers on other hosts reaching the scheduler and each other,
no server on every interface, Slurm refusing a request, a job's walltime.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from ..page import hpc_example
from .conftest import Driver
from .slurm import PARTITION, SlurmCluster

REPO = str(Path(__file__).resolve().parents[2])
HPC: dict[str, Any] = {
    "resource": "slurm",
    "queue": PARTITION,
    "nodes": 3,
    "cores_per_node": 2,
    "walltime": 10,
}

Paused = Callable[[str], tuple[dict[str, Any], Callable[[], dict[str, Any]]]]

HEAD = """
import asyncio, json, os, subprocess, sys, time
from asyncflow import DaskExecutionBackend, WorkflowEngine
from asyncflow.errors import BackendStartError, WorkerLostError

def node(i=0):
    time.sleep(0.3)
    return os.environ["SLURMD_NODENAME"]

async def pause(ready):
    print(json.dumps(ready), flush=True)
    await asyncio.to_thread(sys.stdin.readline)
"""


@pytest.fixture
def paused(slurm: SlurmCluster, tmp_path: Path) -> Iterator[Paused]:
    """``ready, finish = paused(code)``: run a workflow script on the login node
    until it prints its first JSON line (and awaits ``pause``); ``finish()``
    lets it go on and returns its last JSON line."""
    procs: list[subprocess.Popen[str]] = []

    def start(code: str) -> tuple[dict[str, Any], Callable[[], dict[str, Any]]]:
        script = tmp_path / "paused.py"
        script.write_text(textwrap.dedent(HEAD) + textwrap.dedent(code))
        proc = slurm.popen(
            [sys.executable, str(script)], stdin=-1, stdout=-1, stderr=-1,
            cwd=str(tmp_path),
        )  # fmt: skip
        procs.append(proc)
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.strip():
            _, err = proc.communicate(timeout=30)
            pytest.fail(f"driver exited {proc.returncode}\n{err[-6000:]}")

        def finish() -> dict[str, Any]:
            out, err = proc.communicate("go\n", timeout=120)
            if proc.returncode != 0:
                pytest.fail(f"driver exited {proc.returncode}\n{out}\n{err[-6000:]}")
            return dict(json.loads(out.strip().splitlines()[-1]))

        return json.loads(line), finish

    yield start
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()
        proc.wait()


@pytest.mark.timeout(30)
def test_the_dict_becomes_a_job_script_and_typos_fail_in_the_constructor() -> None:
    from dask_jobqueue.slurm import SLURMJob

    from asyncflow import DaskExecutionBackend, TaskDefinitionError
    from asyncflow.adapters.dask.slurm import SlurmPlan, cluster_options, node_shape

    gpu_nodes = {
        **HPC, "nodes": 2, "cores_per_node": 8, "gpus_per_node": 4, "walltime": 90,
        "account": "abc", "memory_per_node": 16000, "worker_init": "module load x",
    }  # fmt: skip
    plan = SlurmPlan.from_mapping(gpu_nodes)
    opts = cluster_options(
        plan, node_shape(plan), "10.9.9.9", "asyncflow-t", ("/l", "/tmp/af-x1")
    )
    del opts["scheduler_options"]  # the cluster's, not the job's
    script = SLURMJob("tcp://10.9.9.9:1", name="w", **opts).job_script()
    for line in [
        "#SBATCH -p debug", "#SBATCH -A abc", "#SBATCH --cpus-per-task=8",
        "#SBATCH --mem=16000M", "#SBATCH -t 01:30:00", "#SBATCH --nodes=1",
        "#SBATCH --gres=gpu:4", "#SBATCH -J asyncflow-t", "module load x",
        'export TMPDIR="${TMPDIR:-/tmp}"/af-x1 && mkdir -p "$TMPDIR"',
        f"{sys.executable} -m distributed.cli.dask_worker tcp://10.9.9.9:1",
        "--nthreads 2", "--nworkers 4", "--resources CPU=2,GPU=1",
        "--dashboard-address 127.0.0.1:0",
    ]:  # fmt: skip
        assert line in script, (line, script)
    cases: list[tuple[dict[str, Any], str]] = [
        ({"nodez": 3}, "unknown key(s) ['nodez']"),
        ({"walltime": "1h"}, "'walltime' must be a whole number"),
        ({"processes_per_node": 3}, "must divide cores_per_node (2)"),
        ({"resource": "pbs"}, "resource 'pbs' is not a batch system"),
    ]
    for bad, why in cases:
        with pytest.raises(TaskDefinitionError) as err:
            DaskExecutionBackend({**HPC, **bad})
        assert why in str(err.value) and "DaskExecutionBackend" in str(err.value)


@pytest.mark.timeout(120)
def test_the_pages_hpc_example_runs_on_slurm(driver: Driver) -> None:
    sources = hpc_example("DaskExecutionBackend", repr(HPC))
    out = driver(
        f"""
        import asyncio, contextlib, io, json, sys, time
        sys.path.insert(0, {REPO!r})
        from tests.page import run_blocks

        if __name__ == "__main__":
            printed, t0 = io.StringIO(), time.monotonic()
            with contextlib.redirect_stdout(printed):
                asyncio.run(run_blocks({sources!r}, {{"__name__": "page"}}))
            took = time.monotonic() - t0
            print(json.dumps({{"out": printed.getvalue(), "took": took}}))
        """,
        timeout=100,
    )
    text = out["out"]
    assert text.count("Starting workflow") == 5, text
    done = re.findall(r"^Workflow (\d) completed", text, flags=re.M)
    assert sorted(done) == ["0", "1", "2", "3", "4"], text
    assert "Total time running asynchronously is" in text
    print(f"page example, constructor to shutdown: {out['took']:.1f} s")


@pytest.mark.timeout(120)
def test_tasks_spread_over_nodes_and_data_moves_between_them(
    paused: Paused, slurm: SlurmCluster
) -> None:
    ready, finish = paused(
        f"""
        def big(n):
            return os.environ["SLURMD_NODENAME"].encode() * (n // 2)

        def took_in(data):
            from distributed import get_worker
            moved = [(t["who"], t["total"]) for t in get_worker().transfer_incoming_log]
            return [len(data), data[:2].decode(), node(), moved]

        async def main():
            t0 = time.monotonic()
            backend = DaskExecutionBackend({HPC!r})
            flow = WorkflowEngine(backend=backend)
            where = flow.function_task(node)
            first = await where()
            first_s = time.monotonic() - t0
            nodes = await asyncio.gather(*[where(i) for i in range(12)])
            await pause({{"nodes": nodes, "first_s": first_s}})
            ident = await backend.client.scheduler.identity(n_workers=-1)
            hosts = {{}}
            for addr, w in ident["workers"].items():
                hosts.setdefault(w["host"], addr)
            (a, b), hosts_seen = sorted(hosts.values())[:2], sorted(hosts)
            make = flow.function_task(options={{"workers": [a]}})(big)
            use = flow.function_task(options={{"workers": [b]}})(took_in)
            moved = await use(make(20_000_000))
            gpu = flow.function_task(resources={{"gpus": 1}})(node)
            t1 = time.monotonic()
            try:
                await gpu()
            except Exception as exc:
                gpu_s = time.monotonic() - t1
                gpu_error = f"{{type(exc).__name__}}: {{exc}}"
            t2 = time.monotonic()
            await flow.shutdown()
            print(json.dumps({{"moved": moved, "a": a, "b": b, "hosts": hosts_seen,
                              "gpu_error": gpu_error, "gpu_s": gpu_s,
                              "shutdown_s": time.monotonic() - t2}}))

        if __name__ == "__main__":
            asyncio.run(main())
        """
    )
    jobs = slurm.jobs()
    assert len(jobs) == 3, jobs
    for job in jobs:
        assert job["name"].startswith("asyncflow-") and job["state"] == "RUNNING"
        assert (job["partition"], job["nodes"], job["timelimit"]) == (
            PARTITION, "1", "10:00"
        )  # fmt: skip
        shown = slurm.scontrol_job(job["id"])
        assert (shown["Partition"], shown["NumNodes"], shown["TimeLimit"]) == (
            PARTITION, "1", "00:10:00"
        )  # fmt: skip
    assert {slurm.scontrol_job(j["id"])["NodeList"] for j in jobs} == {"n1", "n2", "n3"}
    out = finish()
    assert len(set(ready["nodes"])) >= 2, ready
    size, made_on, used_on, moved = out["moved"]
    assert size == 20_000_000 and made_on != used_on, out
    assert [who for who, total in moved if total >= 20_000_000] == [out["a"]], moved
    error = out["gpu_error"]
    assert error.startswith("ResourceUnavailableError: task 'node'"), error
    assert "gpus_per_node" in error and out["gpu_s"] < 5, out
    print(
        f"3 nodes: first result {ready['first_s']:.1f} s after the constructor, "
        f"shutdown {out['shutdown_s']:.1f} s, GPU refusal {out['gpu_s']:.2f} s"
    )


@pytest.mark.timeout(150)
def test_a_node_lost_fails_only_its_tasks_and_the_rest_goes_on(
    paused: Paused, slurm: SlurmCluster, tmp_path: Path
) -> None:
    """One of two jobs SIGKILLed by Slurm, as when its node fails: the tasks it
    ran fail naming the job; those on the other node finish, and later tasks
    run there."""
    where = tmp_path / "started"
    where.mkdir()
    ready, finish = paused(
        f"""
        def hold(where, i):
            me = os.environ["SLURMD_NODENAME"]
            with open(os.path.join(where, "..", f"pid.{{i}}"), "w") as f:
                f.write(str(os.getpid()))
            open(os.path.join(where, f"{{i}}.{{me}}"), "w").close()
            while not os.path.exists(os.path.join(where, "go")):
                time.sleep(0.05)
            return me

        async def main():
            flow = WorkflowEngine(
                backend=DaskExecutionBackend({ {**HPC, "nodes": 2}!r})
            )
            held = [flow.function_task(hold)({str(where)!r}, i) for i in range(4)]
            while len(os.listdir({str(where)!r})) < 4:
                await asyncio.sleep(0.1)
            await pause(sorted(os.listdir({str(where)!r})))
            open(os.path.join({str(where)!r}, "go"), "w").close()
            outcomes = await asyncio.gather(*held, return_exceptions=True)
            where = flow.function_task(node)
            later = await asyncio.gather(*[where(i) for i in range(4)])
            await flow.shutdown()
            print(json.dumps({{
                "outcomes": [o if isinstance(o, str) else f"{{type(o).__name__}}: {{o}}"
                             for o in outcomes],
                "later": later,
            }}))

        if __name__ == "__main__":
            asyncio.run(main())
        """
    )
    on = {int(i): n for i, n in (name.split(".") for name in ready)}
    assert len(set(on.values())) == 2, ready
    lost = on[0]
    (job,) = [
        j for j in slurm.jobs() if slurm.scontrol_job(j["id"])["NodeList"] == lost
    ]
    slurm.run(["scancel", "--signal=KILL", "--full", job["id"]], timeout=30)
    # scancel only asks: on a busy machine a held task could still see "go"
    # and return before its worker is killed
    doomed = [
        psutil.Process(int((tmp_path / f"pid.{i}").read_text()))
        for i, n in on.items()
        if n == lost
    ]
    _, alive = psutil.wait_procs(doomed, timeout=60)
    assert not alive, f"Slurm has not killed the job's workers: {alive}"
    out = finish()
    for i, outcome in enumerate(out["outcomes"]):
        if on[i] == lost:
            assert outcome.startswith("WorkerLostError: task 'hold'"), out
            assert f"Slurm job {job['id']}" in outcome, out
        else:
            assert outcome == on[i], out
    assert set(out["later"]) == set(on.values()) - {lost}, out


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("ask", "reason"),
    [
        ({"nodes": 5}, "Requested node configuration is not available"),
        ({"queue": "nope"}, "invalid partition"),
        # not in the preflight: sbatch refuses the job script itself
        ({"memory_per_node": 999_999}, "Memory specification can not be satisfied"),
    ],
)
def test_an_impossible_request_fails_at_once_with_slurms_reason(
    driver: Driver, ask: dict[str, Any], reason: str
) -> None:
    out = driver(
        textwrap.dedent(HEAD)
        + f"""
async def main():
    t0 = time.monotonic()
    flow = WorkflowEngine(backend=DaskExecutionBackend({ {**HPC, **ask}!r}))
    try:
        await flow.function_task(node)()
    except BackendStartError as exc:
        error, took = str(exc), time.monotonic() - t0
    await flow.shutdown()
    print(json.dumps({{"error": error, "took": took}}))

if __name__ == "__main__":
    asyncio.run(main())
""",
        timeout=50,
    )
    assert reason in out["error"] and "DaskExecutionBackend" in out["error"], out
    assert out["took"] < 15, out
    print(f"{ask}: refused after {out['took']:.2f} s")


@pytest.mark.timeout(200)
def test_a_job_past_its_walltime_fails_every_unfinished_task(driver: Driver) -> None:
    out = driver(
        textwrap.dedent(HEAD)
        + f"""
async def main():
    flow = WorkflowEngine(
        backend=DaskExecutionBackend({ {**HPC, "nodes": 1, "walltime": 1}!r})
    )
    where = flow.function_task(node)
    await where()
    t0 = time.monotonic()  # the job runs: its minute has begun

    @flow.executable_task
    async def sleeper():
        return "/bin/sleep 300"

    @flow.function_task
    def nap(i):
        time.sleep(300)

    # 5 tasks for 2 cores: 3 of them never start (Dask queues them for ever)
    tasks = [sleeper(), sleeper(), *(nap(i) for i in range(3))]
    outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    failed_s, failed_at = time.monotonic() - t0, time.time()
    job = str(outcomes[0]).split("Slurm job ")[1].split()[0]
    shown = subprocess.run(["scontrol", "-o", "show", "job", job],
                           capture_output=True, text=True).stdout
    def at(key):
        stamp = shown.split(key + "=")[1].split()[0]
        return time.mktime(time.strptime(stamp, "%Y-%m-%dT%H:%M:%S"))
    after_end, ran = failed_at - at("EndTime"), at("EndTime") - at("StartTime")
    t1 = time.monotonic()
    try:
        await where()
    except WorkerLostError as exc:
        later, later_s = str(exc), time.monotonic() - t1
    t2 = time.monotonic()
    await flow.shutdown()
    print(json.dumps({{
        "outcomes": [f"{{type(o).__name__}}: {{o}}" for o in outcomes],
        "failed_s": failed_s, "after_end": after_end, "ran": ran,
        "later": later, "later_s": later_s,
        "shutdown_s": time.monotonic() - t2,
    }}))

if __name__ == "__main__":
    asyncio.run(main())
""",
        timeout=180,
    )
    for outcome in out["outcomes"]:
        assert outcome.startswith("WorkerLostError: task "), out["outcomes"]
        assert "reached its walltime" in outcome, out["outcomes"]
    assert "'sleeper'" in out["outcomes"][0] and "'nap'" in out["outcomes"][-1]
    assert "reached its walltime" in out["later"] and out["later_s"] < 2, out
    # Slurm's EndTime has whole seconds; BatchJobs polls every 2 s
    assert -1 <= out["after_end"] < 10 and out["shutdown_s"] < 30, out
    print(
        f"walltime: Slurm ended the 1-minute job after {out['ran']:.0f} s, the "
        f"tasks failed {out['after_end']:.1f} s later; shutdown "
        f"{out['shutdown_s']:.1f} s"
    )


@pytest.mark.timeout(90)
def test_a_job_waiting_in_the_queue_is_reported_and_then_runs(
    paused: Paused, slurm: SlurmCluster
) -> None:
    blocker = slurm.run(
        ["sbatch", "--parsable", "-N3", "-o", "/dev/null", "--wrap", "sleep 300"]
    )
    assert blocker.returncode == 0, blocker.stderr
    try:
        ready, finish = paused(
            f"""
            async def main():
                t0 = time.monotonic()
                flow = WorkflowEngine(backend=DaskExecutionBackend({HPC!r}))
                seen, queued = [], asyncio.Event()
                def on(event):
                    if event.kind.value == "backend":
                        seen.append([event.name, event.detail])
                        if event.name == "queued":
                            queued.set()
                flow.subscribe(on)
                task = asyncio.ensure_future(flow.function_task(node)())
                await asyncio.wait_for(queued.wait(), 30)
                await pause({{"seen": seen}})
                t1 = time.monotonic()
                result = await asyncio.wait_for(task, 60)
                await flow.shutdown()
                print(json.dumps({{"seen": seen, "result": result,
                                  "after_queue_s": time.monotonic() - t1}}))

            if __name__ == "__main__":
                asyncio.run(main())
            """
        )
        mine = [j for j in slurm.jobs() if j["name"].startswith("asyncflow-")]
        assert {j["state"] for j in mine} == {"PENDING"} and len(mine) == 3, mine
    finally:
        slurm.run(["scancel", blocker.stdout.strip()])
    out = finish()
    assert any("waiting in the queue" in d for s, d in ready["seen"] if s == "queued")
    assert out["result"] in slurm.nodes
    assert any(state == "running" for state, _ in out["seen"]), out["seen"]
    print(f"queued: first result {out['after_queue_s']:.1f} s after the queue freed")


@pytest.mark.timeout(90)
def test_a_killed_driver_leaves_no_job(paused: Paused, slurm: SlurmCluster) -> None:
    ready, _ = paused(
        f"""
        async def main():
            flow = WorkflowEngine(backend=DaskExecutionBackend({HPC!r}))
            await flow.function_task(node)()
            await pause({{"pid": os.getpid()}})

        if __name__ == "__main__":
            asyncio.run(main())
        """
    )
    assert len(slurm.jobs()) == 3
    os.killpg(ready["pid"], signal.SIGKILL)
    t0 = time.monotonic()
    left = slurm.wait_no_jobs(20)
    took = time.monotonic() - t0
    assert left == [], f"still queued {took:.1f} s after SIGKILL: {left}"
    print(f"killed driver: queue empty {took:.1f} s after SIGKILL")


def _listeners(ss: str) -> list[tuple[str, str]]:
    """(local address, process) of every listening socket but Slurm's own."""
    rows = []
    for line in ss.splitlines()[1:]:
        fields = line.split()
        process = " ".join(fields[5:])  # "dask worker [tcp://...]" has spaces
        if len(fields) >= 6 and "slurm" not in process:
            rows.append((fields[3], process))
    return rows


def _wildcard(addr: str) -> bool:
    return addr.startswith(("0.0.0.0:", "*:", "[::]:"))


@pytest.mark.timeout(120)
def test_nothing_listens_outside_the_namespaces_or_on_every_interface(
    paused: Paused, slurm: SlurmCluster
) -> None:
    ready, finish = paused(
        f"""
        async def main():
            backend = DaskExecutionBackend({HPC!r})
            flow = WorkflowEngine(backend=backend)
            await flow.function_task(node)()
            await backend.client.wait_for_workers(6, timeout=60)
            await pause({{"pid": os.getpid()}})
            await flow.shutdown()
            print(json.dumps({{}}))

        if __name__ == "__main__":
            asyncio.run(main())
        """
    )
    seen: dict[str, list[tuple[str, str]]] = {}
    for where in ["login", *slurm.nodes]:
        res = subprocess.run(
            [*slurm.nsenter(where), "ss", "-ltnp"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert res.returncode == 0, res.stderr
        seen[where] = _listeners(res.stdout)
    ours = set()
    for where in ["login", *slurm.nodes]:
        pids = subprocess.run(
            ["ip", "netns", "pids", slurm.netns(where)], capture_output=True, text=True
        ).stdout.split()
        ours.update(pids)
    outside = subprocess.run(["ss", "-ltnp"], capture_output=True, text=True).stdout
    finish()

    # the login node: the scheduler on its cluster address, the rest on loopback
    login = seen["login"]
    assert all(f"pid={ready['pid']}," in proc for _, proc in login), login
    public = [a for a, _ in login if not a.startswith("127.0.0.1:")]
    assert len(public) == 1 and public[0].startswith(f"{slurm.login_address}:"), login
    for n in slurm.nodes:  # two workers and their nannies on the node's address
        addr = slurm.addresses[n]
        assert all(a.split(":")[0] in (addr, "127.0.0.1") for a, _ in seen[n]), seen
        assert sum(a.startswith(f"{addr}:") for a, _ in seen[n]) >= 4, seen[n]
    wild = [(w, a, p) for w, rows in seen.items() for a, p in rows if _wildcard(a)]
    assert wild == [], wild
    leaked = [
        line
        for line in outside.splitlines()
        if set(re.findall(r"pid=(\d+)", line)) & ours
    ]
    assert leaked == [], leaked
