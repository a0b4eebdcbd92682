"""Chaos driver: a mixed workflow of at least 5,000 tasks while workers die.

``python chaos.py BACKEND TASKS SEED`` prints one JSON line (see ``drivers.py``
for the conventions).  The workflow is groups of fan-outs with a fan-in, chains,
diamonds and executables; about one task in a hundred fails on purpose, and half
the groups ask for ``retries=2``.  While it runs, a controller SIGKILLs a random
worker process every 0.3 to 1.5 s once ``PROGRESS`` more tasks have ended (on
radical.pilot: a process running a task or a chunk of them), and on runtimes
whose central process is not the driver itself (Ray's head, Parsl's
interchange, radical.pilot's whole pilot) kills that once, when three quarters
of the tasks have ended.

With ``ASYNCFLOW_HPC`` set (the page's allocation dict, as JSON), the backend is
the one a user gets on a cluster (``ASYNCFLOW_BACKEND`` names it), and the head
is a batch job: Slurm SIGKILLs every process of one running job of this
workflow, as when its node fails.

Every task must end in one of the allowed ways: its right value, its own planned
error, ``WorkerLostError``, or ``DependencyFailureError`` with an upstream that
did not succeed.  Anything else is counted as ``wrong``; a future still pending
once no task has ended for :data:`STALL` seconds as ``pending``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from asyncflow import (
    DependencyFailureError,
    ExecutableFailedError,
    TaskFuture,
    WorkerLostError,
    WorkflowEngine,
)
from asyncflow.registry import default_backend

sys.path.insert(0, str(Path(__file__).parent))
from drivers import (
    _kill,
    _left_files,
    describe,
    emit,
    left_after,
    note,
    owned,
    runtime_processes,
)

FAIL_EVERY = 97  # task numbers divisible by this raise on purpose
NAP = 0.004  # seconds of work per function task: long enough to be hit
PROGRESS = 50  # tasks that must end between two kills
#: seconds the runtime may take to start: a radical.pilot pilot takes 20-95 s
#: here, more under load (its adapter allows 600)
START = {"radical": 700.0}
#: the allocation this driver runs on, if any (a user's ``--hpc``)
HPC = bool(os.environ.get("ASYNCFLOW_HPC"))
#: seconds without any task ending after which the workflow counts as hung:
#: on a busy machine a killed worker takes seconds to come back, and on the test
#: cluster it restarts as a fresh interpreter in a batch job, on the same cores
#: as Slurm, the driver and the rest of the suite
STALL = 180.0 if HPC else 120.0
#: seconds the whole workflow may take, so that a crawl still ends in a report
#: before the test's own timeout: how fast it drains depends on the machine's
#: load (radical.pilot's pilot does 15-50 tasks a second here), that it keeps
#: draining does not
DRAIN = {"radical": 900.0}


def mix(i: int, *ups: int) -> int:
    time.sleep(NAP)
    if i % FAIL_EVERY == 0:
        raise ValueError(f"planned failure {i}")
    return i + sum(ups)


@dataclass
class Planned:
    fut: TaskFuture
    value: Any  # what it returns, or the exception type it raises on purpose
    deps: list[Planned] = field(default_factory=list)


class Workflow:
    """Builds the groups and knows every task's right ending."""

    def __init__(self, flow: WorkflowEngine) -> None:
        self.plain = flow.function_task(mix)
        self.retried = flow.function_task(retries=2)(mix)
        self.echo = flow.executable_task(lambda n: ["echo", str(n)])
        self.fail = flow.executable_task(lambda n: f"echo {n}; exit 3")
        self.tasks: list[Planned] = []

    def call(self, retry: bool, i: int, *deps: Planned) -> Planned:
        fn = self.retried if retry else self.plain
        fut = fn(i, *(d.fut for d in deps))
        if i % FAIL_EVERY == 0:
            value: Any = ValueError
        elif any(isinstance(d.value, type) for d in deps):
            value = DependencyFailureError
        else:
            value = i + sum(d.value for d in deps)
        planned = Planned(fut, value, list(deps))
        self.tasks.append(planned)
        return planned

    def group(self, g: int) -> None:
        base, retry = g * 100, g % 2 == 1
        fans = [self.call(retry, base + k) for k in range(1, 21)]
        self.call(retry, base + 21, *fans)
        link = self.call(retry, base + 30)
        for k in range(31, 40):
            link = self.call(retry, base + k, link)
        top = self.call(retry, base + 50)
        left, right = self.call(retry, base + 51, top), self.call(retry, base + 52, top)
        self.call(retry, base + 53, left, right)
        self.tasks.append(Planned(self.echo(base + 60), f"{base + 60}\n"))
        if g % 5 == 0:
            self.tasks.append(Planned(self.fail(base + 61), ExecutableFailedError))


def ending(p: Planned) -> str:
    """How ``p`` ended: ``ok``, ``own``, ``lost``, ``dependency`` or ``wrong``."""
    fut = p.fut
    if not fut.done():
        return "pending"
    if fut.cancelled():
        return "wrong"
    exc = fut.exception()
    if exc is None:
        return "ok" if fut.result() == p.value else "wrong"
    if isinstance(exc, WorkerLostError):
        return "lost"
    if isinstance(exc, DependencyFailureError):
        upstream_failed = any(d.fut.done() and ending(d) != "ok" for d in p.deps)
        return "dependency" if upstream_failed or not p.deps else "wrong"
    if isinstance(p.value, type) and isinstance(exc, p.value):
        return "own"
    return "wrong"


# -- what to kill, per backend ------------------------------------------------------
def _cmd(p: psutil.Process) -> str:
    with contextlib.suppress(psutil.Error):
        return " ".join(p.cmdline())
    return ""


def workers(name: str, backend: Any) -> list[psutil.Process]:
    """The worker processes of the runtime this driver started."""
    procs = runtime_processes()
    if name == "processes":
        me = _cmd(psutil.Process())
        return [p for p in procs if p.ppid() == os.getpid() and _cmd(p) == me]
    if name == "dask":  # the worker process (its title), not its nanny
        return [p for p in procs if _cmd(p).startswith("dask worker")]
    if name == "ray":
        # ray::IDLE or ray::<task>; not the raylet's agents, whose loss is the
        # raylet's (a head kill, below)
        return [
            p
            for p in procs
            if p.name().startswith("ray::") and not p.name().endswith("Agent")
        ]
    if name == "parsl":
        # A whole worker pool (a node's manager with its workers), not one
        # worker process: a worker killed while it holds the pool's shared
        # queue or counter lock hangs every other worker of the pool, which
        # Parsl cannot notice (see the reliability notes).
        pools = [p for p in procs if "process_worker_pool" in _cmd(p)]
        # On a cluster the last pool is the block's job: its loss is the head
        # kill's (a whole job), which must find the job still there.
        return [] if HPC and len(pools) < 2 else pools
    if name == "radical":
        if HPC:  # started by Slurm, without the run's marker
            procs = procs + _pilot_processes(backend)
        return _radical_task_processes(procs)
    return []


def _radical_task_processes(procs: list[psutil.Process]) -> list[psutil.Process]:
    """The processes running radical.pilot function tasks (a chunk each), which
    the adapter's raptor worker titles ``rp.dispatch.<task>``.

    Not the process the worker forks per task, which forks the task's own and
    watches it (raptor would never hear of the task again if it died), nor
    raptor's master and workers, nor the agent: losing one of those is the
    pilot's loss (the head kill, below).  The executables here are ``echo``, a
    shell builtin that runs in no process of its own."""
    return [p for p in procs if _cmd(p).startswith("rp.dispatch.")]


def _pilot_processes(backend: Any) -> list[psutil.Process]:
    """The processes of a pilot in a batch job: Slurm starts them without this
    run's environment (its marker), but each works under the pilot's sandbox."""
    from radical_driver import pilot_sandbox

    from asyncflow.adapters.radical.reaper import working_under

    found = []
    for pid in working_under([pilot_sandbox(backend)]):
        with contextlib.suppress(psutil.Error):
            found.append(psutil.Process(pid))
    return found


def head(name: str, backend: Any) -> Callable[[], list[str]] | None:
    """How to kill the runtime's central process(es), if they are not this
    driver; the action returns what it killed."""
    if HPC:
        return batch_job
    if name == "ray":
        names = {"gcs_server", "raylet"}
        return lambda: _kill([p for p in runtime_processes() if p.name() in names])
    if name == "parsl":

        def interchange() -> list[str]:
            (htex,) = [e for e in backend.dfk.executors.values() if e.label == "htex"]
            return _kill([psutil.Process(htex.interchange_proc.pid)])

        return interchange
    if name == "radical":
        from radical_driver import kill_pilot, pilot_sandbox

        def pilot() -> list[str]:  # the agent, its components, raptor, the tasks
            return kill_pilot(pilot_sandbox(backend))

        return pilot
    return None


def batch_job() -> list[str]:
    """SIGKILL every process of this workflow's oldest running job (Slurm's
    ``scancel --signal=KILL --full``: the batch shell and every step), as when
    its node fails."""
    squeue = ["squeue", "-h", "-t", "RUNNING", "-o", "%i"]
    running = subprocess.run(squeue, capture_output=True, text=True, timeout=60)
    ids = sorted(int(line) for line in running.stdout.split() if line.isdigit())
    if not ids:
        return []
    cancel = ["scancel", "--signal=KILL", "--full", str(ids[0])]
    subprocess.run(cancel, capture_output=True, text=True, timeout=60, check=True)
    return [f"Slurm job {ids[0]}"]


def kill_one(victims: list[psutil.Process], rng: random.Random) -> str | None:
    if not victims:
        return None
    victim = rng.choice(victims)
    (said,) = describe([victim]) or ["?"]
    with contextlib.suppress(psutil.Error):
        family = victim.children(recursive=True)
        victim.kill()
        for child in family:
            with contextlib.suppress(psutil.Error):
                child.kill()
        return said
    return None


async def controller(
    pick: Callable[[], list[psutil.Process]],
    wf: Workflow,
    rng: random.Random,
    kills: list[str],
    heads: Callable[[], list[str]] | None,
    every: tuple[float, float] = (0.3, 1.5),
) -> None:
    """Kill a random worker ``every`` so many seconds, once the workflow has
    moved on since the last kill; the head once, late.

    Without the progress rule the kills outpace a busy machine: a Dask worker
    takes seconds to restart under load, and two of them killed every second
    run nothing at all, on any runtime, which tests no promise."""
    head_done = heads is None
    at_last_kill = -PROGRESS
    while True:
        await asyncio.sleep(rng.uniform(*every))
        ended = sum(p.fut.done() for p in wf.tasks)
        note(f"{ended} of {len(wf.tasks)} ended, {len(kills)} kills")
        if ended == len(wf.tasks):
            return
        if ended - at_last_kill < PROGRESS:
            continue
        at_last_kill = ended
        if heads is not None and not head_done and ended >= 0.75 * len(wf.tasks):
            head_done = True
            gone = await asyncio.to_thread(heads)
            kills.extend(f"HEAD {g}" for g in gone)
            note(f"killed the head: {gone}")
            continue
        said = await asyncio.to_thread(lambda: kill_one(pick(), rng))
        if said:
            kills.append(said)


def own(path: str) -> bool:
    """Whether ``path`` is this interpreter's own multiprocessing temp dir
    (``pymp-*``, made for the first listener a process opens and removed when
    the interpreter exits), which belongs to no backend."""
    import multiprocessing.process

    mine = multiprocessing.process.current_process()._config.get("tempdir")
    return bool(mine) and path.split("/")[0] == Path(mine).name


def _example(p: Planned) -> str:
    fut = p.fut
    if fut.done() and not fut.cancelled() and fut.exception() is not None:
        return f"{fut!r}: {fut.exception()!r}"[:300]
    return repr(fut)


async def drain(futs: list[TaskFuture], within: float) -> None:
    """Wait until every future is done, or none has ended for :data:`STALL`
    seconds (a hang), or ``within`` seconds have passed."""
    deadline = time.monotonic() + within
    pending, before = set(futs), len(futs) + 1
    while pending and len(pending) < before:
        before = len(pending)
        left = deadline - time.monotonic()
        if left <= 0:
            return
        _, pending = await asyncio.wait(pending, timeout=min(STALL, left))


async def chaos(name: str, total: int, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    backend = default_backend() if HPC else owned(name)
    kills: list[str] = []
    flow = WorkflowEngine(backend)
    await asyncio.wait_for(flow.start(), 700.0 if HPC else START.get(name, 120))
    wf = Workflow(flow)
    g = 0
    while len(wf.tasks) < total:
        wf.group(g)
        g += 1
    begin = time.monotonic()
    heads = head(name, backend)
    killer = asyncio.ensure_future(
        controller(lambda: workers(name, backend), wf, rng, kills, heads)
    )
    await drain([p.fut for p in wf.tasks], DRAIN.get(name, 600.0))
    drained = time.monotonic() - begin
    killer.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await killer
    outcomes = Counter(ending(p) for p in wf.tasks)
    wrong = [_example(p) for p in wf.tasks if ending(p) in ("wrong", "pending")]
    shut = time.monotonic()
    await asyncio.wait_for(flow.shutdown(), 120)
    return {
        "backend": name,
        "tasks": len(wf.tasks),
        "kills": len(kills),
        "killed": kills[:10],
        "heads": [k for k in kills if k.startswith("HEAD")],
        "outcomes": dict(outcomes),
        "drain_s": round(drained, 1),
        "shutdown_s": round(time.monotonic() - shut, 1),
        "wrong_examples": wrong[:5],
        # radical.pilot's watchdog deletes the runtime's temp dir (a sandbox per
        # task) after shutdown, which takes a while on a loaded machine
        "processes_left": left_after(90.0 if name == "radical" or HPC else 15.0),
        "files_left": [
            f for f in _left_files(Path(tempfile.gettempdir())) if not own(f)
        ],
    }


def main() -> None:
    name, total, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    emit(asyncio.run(chaos(name, total, seed)))
    note("done")
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
