"""Ray on Slurm: examples/slurm/ray-cluster.sbatch, attached to and cancelled.

One Ray cluster, started by the example batch script on all three nodes, serves
the module; the last test cancels it.  Drivers run where users run them:

* on the head node, inside the allocation (``srun --overlap --jobid``), with
  ``address="HEAD_IP:6379"``: Ray's own way, through the node's raylet;
* on the login node through Ray Client (``ray://HEAD_IP:10001``), in a PID
  namespace of their own.  The test cluster's nodes share this machine's PID
  namespace, where Ray's ``ps`` search for a local raylet would find the compute
  nodes' raylets and let ``HEAD_IP:6379`` "work" from the login node; on a real
  login node there is none, and so there is none here.

The figures each test measures are printed (``pytest -s`` shows them).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from .conftest import QUEUE_EMPTY_BOUND
from .slurm import SlurmCluster

pytestmark = pytest.mark.timeout(150)

REPO = Path(__file__).resolve().parents[2]
SBATCH = REPO / "examples" / "slurm" / "ray-cluster.sbatch"
#: a login node's view of processes: its own (see the module docstring)
LOGIN = ("unshare", "--pid", "--fork", "--mount-proc")
UP_BOUND = 90.0  # seconds for the whole Ray cluster to come up on a busy machine


class RayJob:
    def __init__(self, job_id: str, job_dir: Path, temp_base: Path, submitted: float):
        self.id = job_id
        self.dir = job_dir
        self.temp_base = temp_base
        self.submitted = submitted
        self.address = ""
        self.up_after = 0.0  # sbatch -> every node joined, seconds
        self.up_in_job = 0.0  # batch script start -> every node joined, seconds

    @property
    def head_ip(self) -> str:
        return self.address.rsplit(":", 1)[0]

    @property
    def token_env(self) -> dict[str, str]:
        return {
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(self.dir / "auth_token"),
            "RAY_USAGE_STATS_ENABLED": "0",
        }


def _output(job: RayJob) -> str:
    out = job.dir.parent / f"ray-cluster-{job.id}.out"
    return out.read_text(errors="replace")[-4000:] if out.exists() else "(no output)"


@pytest.fixture(scope="module")
def ray_job(
    slurm: SlurmCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RayJob]:
    """The example batch script on all three nodes, up and every node joined."""
    base = tmp_path_factory.mktemp("ray")
    # Ray's unix sockets live in its temp dirs: keep the path short and private
    # to this run (job ids restart at 1 in every test cluster on this machine).
    temp_base = Path(tempfile.mkdtemp(prefix="afr", dir="/tmp"))
    env = {
        **slurm.env,
        "RAY_JOB_DIR": str(base / "job"),
        "RAY_TEMP_BASE": str(temp_base),
        "RAY_OBJECT_STORE_BYTES": "100000000",
        "RAY_START_TIMEOUT": str(int(UP_BOUND)),
    }
    t0 = time.monotonic()
    res = slurm.run(
        ["sbatch", "--parsable", "-N3", "-p", "debug", str(SBATCH)],
        cwd=str(base),
        env=env,
    )
    assert res.returncode == 0, res.stderr
    job = RayJob(res.stdout.strip().split(";")[0], base / "job", temp_base, t0)
    try:
        ready = job.dir / "ready"
        deadline = t0 + UP_BOUND
        while not ready.exists():
            if time.monotonic() > deadline or not any(
                j["id"] == job.id for j in slurm.jobs()
            ):
                why = f"the Ray cluster was not up within {UP_BOUND:.0f} s"
                pytest.fail(f"{why}\n{_output(job)}")
            time.sleep(0.2)
        job.up_after = time.monotonic() - t0
        job.address = ready.read_text().strip()
        token = job.dir / "auth_token"
        job.up_in_job = ready.stat().st_mtime - token.stat().st_mtime
        print(
            f"\nRay cluster up: {job.up_after:.1f} s after sbatch, "
            f"{job.up_in_job:.1f} s after the batch script started"
        )
        yield job
    finally:
        # Normally the last test has cancelled the job; this is the safety net.
        if any(j["id"] == job.id for j in slurm.jobs()):
            slurm.run(["scancel", job.id])
        slurm.wait_no_jobs(QUEUE_EMPTY_BOUND)
        _wait_nodes_empty(slurm, QUEUE_EMPTY_BOUND)
        shutil.rmtree(temp_base, ignore_errors=True)


@pytest.fixture(autouse=True)
def _queue_left_empty() -> Iterator[None]:
    """Overrides conftest's: the Ray cluster's job spans this module, and its
    last test cancels the job and checks that the queue and nodes are empty."""
    yield


def _python(
    slurm: SlurmCluster,
    where: Path,
    code: str,
    *,
    prefix: Sequence[str] = (),
    env: dict[str, str] | None = None,
    timeout: float = 120,
) -> dict[str, Any]:
    """Run ``code`` with this interpreter on the login node, behind ``prefix``
    (``srun ...`` to run it in the allocation); the JSON of its last line."""
    script = where / "driver.py"
    script.write_text(textwrap.dedent(code))
    res = slurm.run(
        [*prefix, sys.executable, str(script)],
        timeout=timeout,
        cwd=str(where),
        env=env if env is not None else slurm.env,
    )
    if res.returncode != 0:
        pytest.fail(
            f"driver exited {res.returncode}\n--- stdout\n{res.stdout[-4000:]}"
            f"\n--- stderr\n{res.stderr[-6000:]}",
            pytrace=False,
        )
    return json.loads(res.stdout.strip().splitlines()[-1])


def _on_head(job: RayJob) -> list[str]:
    """A job step on the head node beside the Ray step, as a user's driver."""
    return ["srun", "--overlap", f"--jobid={job.id}", "-N1", "-n1", "-w", "n1"]


def _left_on_nodes(slurm: SlurmCluster) -> dict[str, list[str]]:
    """Every process in each node's network namespace but its slurmd."""
    left: dict[str, list[str]] = {}
    for node in slurm.nodes:
        res = subprocess.run(
            ["ip", "netns", "pids", slurm.netns(node)], capture_output=True, text=True
        )
        for pid in res.stdout.split():
            with contextlib.suppress(OSError):
                comm = Path(f"/proc/{pid}/comm").read_text().strip()
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1]
                if comm != "slurmd" and state.split()[0] != "Z":
                    left.setdefault(node, []).append(f"{pid} {comm}")
    return left


def _wait_nodes_empty(slurm: SlurmCluster, timeout: float) -> dict[str, list[str]]:
    deadline = time.monotonic() + timeout
    while (left := _left_on_nodes(slurm)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


# -- the cluster -----------------------------------------------------------------------


def test_every_node_joins_with_its_own_address(
    ray_job: RayJob, slurm: SlurmCluster
) -> None:
    joined = {p.name: p.read_text().strip() for p in (ray_job.dir / "nodes").iterdir()}
    assert joined == slurm.addresses
    assert ray_job.address == f"{slurm.addresses['n1']}:6379"
    assert (ray_job.dir / "auth_token").stat().st_mode & 0o777 == 0o600
    env = (ray_job.dir / "env").read_text()
    assert f"RAY_ADDRESS={ray_job.address}" in env
    assert "RAY_AUTH_MODE=token" in env
    temp_dirs = sorted(p.name for p in ray_job.temp_base.iterdir())
    assert temp_dirs == [f"ray-{ray_job.id}-{n}" for n in slurm.nodes]


# -- attaching from inside the allocation ----------------------------------------------

HEAD_DRIVER = """
import asyncio, json, os, sys, time

import ray

from asyncflow import WorkflowEngine
from asyncflow.adapters.ray import RayExecutionBackend

ADDRESS = os.environ["RAY_ADDRESS"]


def raw_noop():
    return None


async def main():
    t0 = time.monotonic()
    flow = await WorkflowEngine.create(RayExecutionBackend(address=ADDRESS))

    @flow.function_task
    async def where(delay=0.0):
        import os, time
        import ray
        time.sleep(delay)
        return os.environ.get("SLURMD_NODENAME"), ray.util.get_node_ip_address()

    @flow.function_task
    async def noop():
        return None

    first = await where()
    first_after = time.monotonic() - t0
    spread = await asyncio.gather(*(where(0.5) for _ in range(12)))

    await asyncio.gather(*(noop() for _ in range(20)))  # warm both paths up
    t = time.monotonic()
    await asyncio.gather(*(noop() for _ in range(200)))
    asyncflow_rate = 200 / (time.monotonic() - t)
    raw = ray.remote(raw_noop)
    ray.get([raw.remote() for _ in range(20)])
    t = time.monotonic()
    ray.get([raw.remote() for _ in range(200)])
    raw_rate = 200 / (time.monotonic() - t)

    await flow.shutdown()
    connected_after = ray.is_initialized()
    ray.init(address=ADDRESS)  # the cluster is still there, whole
    alive = sorted(n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"])
    ray.shutdown()
    print(json.dumps({
        "first": first, "first_after": first_after, "spread": spread,
        "asyncflow_rate": asyncflow_rate, "raw_rate": raw_rate,
        "connected_after": connected_after, "alive": alive,
    }))


asyncio.run(main())
"""


def test_workflow_from_the_head_node_runs_on_several_nodes(
    ray_job: RayJob, slurm: SlurmCluster, tmp_path: Path
) -> None:
    out = _python(
        slurm,
        tmp_path,
        HEAD_DRIVER,
        prefix=_on_head(ray_job),
        env={**slurm.env, **ray_job.token_env, "RAY_ADDRESS": ray_job.address},
    )
    by_node = {name: ip for name, ip in map(tuple, out["spread"])}
    assert len(by_node) >= 2, out["spread"]
    assert all(slurm.addresses[name] == ip for name, ip in by_node.items())
    assert out["connected_after"] is False
    assert out["alive"] == sorted(slurm.addresses.values())
    print(
        f"\nhead-node driver: first result {out['first_after']:.2f} s after "
        f"attaching; tasks on {sorted(by_node)}; 200 no-ops: asyncflow "
        f"{out['asyncflow_rate']:.0f}/s, raw f.remote() {out['raw_rate']:.0f}/s"
    )


# -- attaching from the login node -----------------------------------------------------

LOGIN_DRIVER = """
import asyncio, contextlib, io, json, os, sys, time

sys.path.insert(0, os.environ["REPO"])
from asyncflow import WorkflowEngine
from asyncflow.adapters.ray import RayExecutionBackend
from asyncflow.errors import BackendStartError
from tests.page import hpc_example, run_blocks

HEAD = os.environ["HEAD_IP"]


async def main():
    # HEAD:6379 needs a raylet on this host; a login node has none.
    t = time.monotonic()
    try:
        await WorkflowEngine.create(RayExecutionBackend(address=f"{HEAD}:6379"))
        direct = None
    except BackendStartError as exc:
        direct = str(exc)
    direct_after = time.monotonic() - t

    t = time.monotonic()
    flow = await WorkflowEngine.create(RayExecutionBackend(address=f"ray://{HEAD}:10001"))

    @flow.function_task
    async def where(delay=0.0):
        import os, time
        time.sleep(delay)
        return os.environ.get("SLURMD_NODENAME")

    first = await where()
    first_after = time.monotonic() - t
    spread = await asyncio.gather(*(where(0.5) for _ in range(12)))
    await flow.shutdown()

    # The reference page's HPC example, with its one backend line switched.
    page = hpc_example("RayExecutionBackend", f"address='ray://{HEAD}:10001'")
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        await run_blocks(page, {"__name__": "page"})
    print(json.dumps({
        "direct": direct, "direct_after": direct_after, "first": first,
        "first_after": first_after, "spread": spread, "page": text.getvalue(),
    }))


asyncio.run(main())
"""


def test_login_node_attaches_through_ray_client_and_runs_the_page(
    ray_job: RayJob, slurm: SlurmCluster, tmp_path: Path
) -> None:
    env = {
        **slurm.env,
        **ray_job.token_env,
        "HEAD_IP": ray_job.head_ip,
        "REPO": str(REPO),
    }
    try:
        out = _python(slurm, tmp_path, LOGIN_DRIVER, prefix=LOGIN, env=env)
    except pytest.fail.Exception as exc:
        # Ray Client's per-driver server on the head: why it did not start
        logs = ray_job.temp_base / f"ray-{ray_job.id}-n1" / "session_latest" / "logs"
        errs = "".join(
            f"\n--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
            for p in sorted(logs.glob("ray_client_server*.err"))
        )
        pytest.fail(f"{exc}{errs}", pytrace=False)
    assert out["direct"] is not None, "HEAD:6379 attached from the login node"
    assert "none runs here" in out["direct"]
    assert f"ray://{ray_job.head_ip}:10001" in out["direct"]
    assert out["direct_after"] < 10
    assert len(set(out["spread"])) >= 2, out["spread"]
    page = out["page"]
    assert page.count("Starting workflow") == 5
    assert page.count(" completed at ") == 5
    assert "Total time running asynchronously is" in page
    print(
        f"\nlogin node: HEAD:6379 refused in {out['direct_after']:.2f} s; through "
        f"Ray Client first result {out['first_after']:.2f} s after attaching; "
        f"tasks on {sorted(set(out['spread']))}"
    )


NO_TOKEN_DRIVER = """
import asyncio, json, os, time

from asyncflow import WorkflowEngine
from asyncflow.adapters.ray import RayExecutionBackend
from asyncflow.errors import BackendStartError


async def main():
    t = time.monotonic()
    try:
        engine = await WorkflowEngine.create(
            RayExecutionBackend(address=os.environ["RAY_ADDRESS"])
        )
    except BackendStartError as exc:
        error = str(exc)
    else:
        await engine.shutdown()
        error = None
    print(json.dumps({"error": error, "after": time.monotonic() - t}))


asyncio.run(main())
"""


@pytest.mark.parametrize("via", ["head-node", "ray-client"])
@pytest.mark.parametrize(
    ("token", "says"),
    [
        ({}, "this driver sent no token"),
        (
            {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64},
            "refused this driver's token",
        ),
    ],
    ids=["missing", "wrong"],
)
def test_attaching_without_the_token_says_what_to_set(
    ray_job: RayJob,
    slurm: SlurmCluster,
    tmp_path: Path,
    via: str,
    token: dict[str, str],
    says: str,
) -> None:
    """Ray itself retries for 20 s (HEAD:6379) or 30 s (ray://) and then raises
    a bare ConnectionError; through Ray Client it never names the token."""
    env = {k: v for k, v in slurm.env.items() if not k.startswith("RAY_AUTH")}
    env["HOME"] = str(tmp_path)  # no ~/.ray/auth_token to fall back on
    if via == "head-node":
        prefix, address = _on_head(ray_job), ray_job.address
    else:
        prefix, address = list(LOGIN), f"ray://{ray_job.head_ip}:10001"
    out = _python(
        slurm,
        tmp_path,
        NO_TOKEN_DRIVER,
        prefix=prefix,
        env={**env, **token, "RAY_ADDRESS": address},
    )
    error = out["error"]
    assert error is not None, "attached without the cluster's token"
    assert says in error
    assert "RAY_AUTH_MODE=token" in error and "RAY_AUTH_TOKEN_PATH" in error
    assert out["after"] < 5
    print(f"\n{via}, {'+'.join(token) or 'no token'}: refused in {out['after']:.2f} s")


# -- the end of the job ----------------------------------------------------------------

BUSY_DRIVER = """
import asyncio, os, pathlib

from asyncflow import WorkflowEngine
from asyncflow.adapters.ray import RayExecutionBackend

MARKS = pathlib.Path(os.environ["MARKS"])


async def main():
    flow = await WorkflowEngine.create(
        RayExecutionBackend(address=os.environ["RAY_ADDRESS"])
    )

    @flow.function_task
    async def busy(marks, i):
        import os, pathlib, time
        pathlib.Path(marks, str(i)).write_text(os.environ.get("SLURMD_NODENAME", ""))
        time.sleep(600)

    await asyncio.gather(*(busy(str(MARKS), i) for i in range(6)))


asyncio.run(main())
"""


def test_zz_scancel_leaves_no_ray_process_on_any_node(
    ray_job: RayJob, slurm: SlurmCluster, tmp_path: Path
) -> None:
    """Cancelled while every CPU runs a task: Ray's raylet and GCS ignore the
    SIGTERM, and the script's trap must kill them and their workers in time."""
    marks = tmp_path / "marks"
    marks.mkdir()
    script = tmp_path / "busy.py"
    script.write_text(textwrap.dedent(BUSY_DRIVER))
    env = {
        **slurm.env,
        **ray_job.token_env,
        "RAY_ADDRESS": ray_job.address,
        "MARKS": str(marks),
    }
    busy = slurm.popen(
        [*_on_head(ray_job), sys.executable, str(script)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        while len(list(marks.iterdir())) < 6:
            assert busy.poll() is None, busy.communicate()[0][-4000:]
            assert time.monotonic() < deadline, "the six tasks did not all start"
            time.sleep(0.1)
        running_on = {p.read_text() for p in marks.iterdir()}
        assert not _left_on_nodes(slurm).keys() ^ set(slurm.nodes)

        t0 = time.monotonic()
        res = slurm.run(["scancel", ray_job.id])
        assert res.returncode == 0, res.stderr
        left = _wait_nodes_empty(slurm, QUEUE_EMPTY_BOUND)
        gone_after = time.monotonic() - t0
        assert not left, f"{gone_after:.1f} s after scancel: {left}"
        queue = slurm.wait_no_jobs(QUEUE_EMPTY_BOUND)
        assert queue == [], queue
        assert list(ray_job.temp_base.iterdir()) == []
        busy.communicate(timeout=30)  # its job step ended with the job
    finally:
        if busy.poll() is None:
            os.killpg(busy.pid, signal.SIGKILL)
            busy.communicate()
    print(
        f"\nscancel with tasks running on {sorted(running_on)}: no process left "
        f"on any node after {gone_after:.2f} s"
    )
