"""Workflow drivers the reliability tests run in a fresh interpreter.

``python drivers.py SCENARIO BACKEND [ARGS...]`` prints one JSON line (the last
line of stdout) describing what happened.  A fresh interpreter keeps one
runtime's fault, or a runtime that takes its driver down with it, away from the
pytest process, and lets the driver count its own threads, children and memory.

The test passes ``ASYNCFLOW_RELIABILITY_MARK`` (every process the runtime starts
inherits it) and, for shutdown, a private ``TMPDIR``.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil

from asyncflow import (
    ConcurrentExecutionBackend,
    ExecutionBackend,
    TaskState,
    WorkflowEngine,
)
from asyncflow.conformance import Gate
from asyncflow.conformance import tasks as t

MARK = "ASYNCFLOW_RELIABILITY_MARK"
_GLOBAL = ("multiprocessing.resource_tracker", "multiprocessing.forkserver")


def owned(name: str, **extra: Any) -> ExecutionBackend:
    """The backend with its defaults and 2 workers, owning its runtime."""
    if name == "threads":
        return ConcurrentExecutionBackend(ThreadPoolExecutor(2))
    if name == "processes":
        return ConcurrentExecutionBackend(ProcessPoolExecutor(2))
    if name == "dask":
        from asyncflow.adapters.dask import DaskExecutionBackend

        return DaskExecutionBackend(**extra)
    if name == "ray":
        from asyncflow.adapters.ray import RayExecutionBackend

        return RayExecutionBackend(**({"num_cpus": 2} | extra))
    if name == "parsl":
        from asyncflow.adapters.parsl import ParslExecutionBackend

        return ParslExecutionBackend(max_workers=2, **extra)
    if name == "radical":
        from asyncflow.adapters.radical import RadicalExecutionBackend

        return RadicalExecutionBackend({"resource": "local.localhost", **extra})
    raise SystemExit(f"unknown backend {name}")


def uninterrupted() -> int:
    """What ``resume_driver.py`` prints when nothing stops it: the sum of 40
    chains of 5 hops, each hop ``before * 3 + chain + step`` from 1."""
    total = 0
    for chain in range(40):
        value = 1
        for step in range(5):
            value = value * 3 + chain + step
        total += value
    return total


def runtime_processes() -> list[psutil.Process]:
    """Live processes of this run: this driver's descendants and every process
    carrying the run's marker (minus this interpreter's multiprocessing helpers)."""
    me = os.getpid()
    token = os.environ.get(MARK)
    roots: dict[int, psutil.Process] = {}
    with contextlib.suppress(psutil.Error):
        roots.update((p.pid, p) for p in psutil.Process(me).children(recursive=True))
    if token:
        for proc in psutil.process_iter():
            with contextlib.suppress(psutil.Error, OSError):
                if proc.pid != me and proc.environ().get(MARK) == token:
                    roots[proc.pid] = proc
                    roots.update((c.pid, c) for c in proc.children(recursive=True))
    mine = {me, *(p.pid for p in psutil.Process(me).parents())}
    out = []
    for proc in roots.values():
        with contextlib.suppress(psutil.Error):
            if proc.pid in mine or proc.status() == psutil.STATUS_ZOMBIE:
                continue
            cmd = " ".join(proc.cmdline())
            if proc.ppid() == me and any(g in cmd for g in _GLOBAL):
                continue
            out.append(proc)
    return out


def wait_gone(procs: list[psutil.Process], within: float) -> list[psutil.Process]:
    """The processes still alive (zombies count as gone) after ``within`` s."""
    deadline = time.monotonic() + within
    while True:
        alive = []
        for p in procs:
            with contextlib.suppress(psutil.Error):
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(p)
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.1)


def describe(procs: list[psutil.Process]) -> list[str]:
    out = []
    for p in procs:
        with contextlib.suppress(psutil.Error):
            out.append(f"{p.pid} {p.name()} {' '.join(p.cmdline())[:100]}")
    return out


def left_after(within: float) -> list[str]:
    deadline = time.monotonic() + within
    while True:
        procs = runtime_processes()
        if not procs or time.monotonic() > deadline:
            return describe(procs)
        time.sleep(0.1)


def note(text: str) -> None:
    """Progress on stderr: where a driver that hangs got to."""
    print(f"[driver {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def emit(result: dict[str, Any]) -> None:
    print(json.dumps(result), flush=True)


class _Outcomes:
    """When and how each future ended, counted from a start time."""

    def __init__(self) -> None:
        self.start = time.monotonic()
        self.ended: dict[str, tuple[str, float, str]] = {}

    def watch(self, label: str, fut: asyncio.Future[Any]) -> None:
        def done(f: asyncio.Future[Any]) -> None:
            if f.cancelled():
                what, text = "CancelledError", ""
            elif f.exception() is not None:
                exc = f.exception()
                what, text = type(exc).__name__, str(exc)[:300]
            else:
                what, text = "result", repr(f.result())[:80]
            self.ended[label] = (what, round(time.monotonic() - self.start, 3), text)

        fut.add_done_callback(done)


async def _bounded(aw: Any, limit: float) -> float | None:
    """Seconds ``aw`` took, or None if it did not finish within ``limit``."""
    begin = time.monotonic()
    task = asyncio.ensure_future(aw)
    done, _ = await asyncio.wait([task], timeout=limit)
    if not done:
        return None
    with contextlib.suppress(Exception):
        task.result()
    return time.monotonic() - begin


# -- shutdown under load ------------------------------------------------------------
_DASK_SHARED = {"dask-scratch-space", "global.lock", "purge.lock"}


def _left_files(root: Path) -> list[str]:
    return [
        str(p.relative_to(root))
        for p in sorted(root.rglob("*"))
        if not (p.name in _DASK_SHARED and "dask-scratch-space" in p.parts)
    ]


def _guard_ray_auto_init(record: list[str]) -> None:
    """After its shutdown, a backend must not touch Ray: any Ray call would start
    (``ray.init()``) a new Ray without the owning backend's auth token, which
    aborts this process.  Record such calls and refuse them instead."""
    import ray
    import ray._private.auto_init_hook as hook

    def refuse() -> None:
        if ray.is_initialized():
            return
        import traceback

        record.append("".join(traceback.format_stack(limit=6)[:-1]))
        raise RuntimeError("Ray call after the backend shut down")

    hook.auto_init_ray = refuse


async def shutdown_scenario(name: str, load: bool = True) -> dict[str, Any]:
    """``load``: two functions running, 600 tasks queued and 398 waiting; else
    one executable running (in a session of its own), and nothing else."""
    tmp = Path(tempfile.gettempdir())
    threads = {th.ident for th in threading.enumerate()}
    after_shutdown: list[str] = []
    if name == "ray":
        _guard_ray_auto_init(after_shutdown)
    result: dict[str, Any] = {"backend": name, "returned_in": None}
    flow = WorkflowEngine(owned(name))
    hold_for = 4 if name == "threads" else 120
    async with Gate() as gate:
        await asyncio.wait_for(flow.start(), 120)
        hold = flow.function_task(t.gate_wait)
        inc, pack = flow.function_task(t.inc), flow.function_task(t.pack)
        if load:
            running = [hold(gate.address, "held", hold_for) for _ in range(2)]
            await asyncio.wait_for(gate.arrived("held", 2), 60)
            queued = [inc(i) for i in range(600)]
            waiting = [pack(running[i % 2], i) for i in range(398)]
        else:
            running = [flow.executable_task(lambda: gate.command("cmd"))()]
            await asyncio.wait_for(gate.arrived("cmd"), 60)
            queued = waiting = []
        futures = [*running, *queued, *waiting]
        await asyncio.sleep(0)  # one loop turn: the queued ones reach the runtime
        assert all(f.state is TaskState.SUBMITTED for f in queued)
        assert not any(f.done() for f in futures)
        result["during"] = describe(runtime_processes())
        result["returned_in"] = await _bounded(flow.shutdown(), 10)
        await asyncio.sleep(1)  # late callbacks of the runtime run now
        # Still inside the gate: a command left running blocks on it, not EOF.
        result["processes_left"] = left_after(1.0)
    result["futures"] = len(futures)
    result["done"] = sum(f.done() for f in futures)
    result["cancelled"] = sum(f.cancelled() for f in futures)
    result["threads_left"] = [
        th.name for th in threading.enumerate() if th.ident not in threads
    ]
    result["files_left"] = _left_files(tmp)
    result["calls_after_shutdown"] = after_shutdown
    return result


async def ray_late_completion() -> dict[str, Any]:
    """Ray reports a cancelled task's completion after the owning backend shut
    its Ray down (a race the 1,000-task shutdown loses about two runs in three,
    when the process aborts).  Here the late report is delivered on purpose,
    the way Ray's callback thread delivers it, so the outcome is the same every
    run; the guard turns the abort into a recorded call."""
    calls: list[str] = []
    _guard_ray_auto_init(calls)
    backend: Any = owned("ray")
    flow = WorkflowEngine(backend)
    async with Gate() as gate:
        await asyncio.wait_for(flow.start(), 120)
        flow.function_task(t.gate_wait)(gate.address, "held", 120)
        await asyncio.wait_for(gate.arrived("held"), 60)
        refs = {uid: task.ref for uid, task in backend._state.tasks.items()}
        await flow.shutdown()
        note("shut down; now the late completions")
        for uid, ref in refs.items():
            backend._state.cancelled.setdefault(uid, ref)  # not reported yet
            backend._completions.on_ready(uid, None)
        await asyncio.sleep(0.5)
    return {"backend": "ray", "reported": list(refs), "calls_after_shutdown": calls}


# -- the runtime disappears -----------------------------------------------------------
def _kill(procs: list[psutil.Process]) -> list[str]:
    killed = describe(procs)
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.kill()
    return killed


def _children_named(root: int, names: set[str]) -> list[psutil.Process]:
    out = []
    for p in psutil.Process(root).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if p.name() in names:
                out.append(p)
    return out


async def _after_loss(flow: WorkflowEngine, backend: Any) -> dict[str, Any]:
    """Executables submitted once Parsl's executor is bad (Parsl's own path, not
    chunks): how they ended, and how many of them reached the DFK, which raises
    the executor's one exception for each and logs an ever longer traceback."""
    dfk = backend.dfk
    before = dfk.task_count
    echo = flow.executable_task(lambda i: f"echo {i}")
    late = [echo(i) for i in range(200)]
    await asyncio.wait(late, timeout=60)
    return {
        "pending": sum(not f.done() for f in late),
        "kinds": sorted({type(f.exception()).__name__ for f in late if f.done()}),
        "dfk_tasks": dfk.task_count - before,
    }


async def runtime_loss_scenario(name: str, target: str) -> dict[str, Any]:
    """Two tasks running, twenty queued and ten waiting on the running ones; then
    the runtime's central process dies.  ``target``: what to kill (see below)."""
    backend: ExecutionBackend
    killer: Callable[[], list[str]]
    if name == "dask":  # an external scheduler: target is its address@pid
        from asyncflow.adapters.dask import DaskExecutionBackend

        address, pid = target.rsplit("@", 1)
        backend = DaskExecutionBackend(address)

        def killer() -> list[str]:
            return _kill([psutil.Process(int(pid))])

    elif name == "ray" and target == "owned":
        from asyncflow.adapters.ray import RayExecutionBackend

        backend = RayExecutionBackend(num_cpus=2)

        def killer() -> list[str]:
            return _kill(_children_named(os.getpid(), {"gcs_server", "raylet"}))

    elif name == "ray":  # attached: target is the head's address@keeper pid
        from ray._private import ray_constants

        from asyncflow.adapters.ray import RayExecutionBackend

        # The head listens on 127.0.0.1 only; outside Ray's local-only mode
        # ray.init rewrites that address to the machine's external one and
        # never connects (the owning backend uses the same mode).
        ray_constants.ENABLE_RAY_CLUSTER = False
        address, pid = target.rsplit("@", 1)
        backend = RayExecutionBackend(address=address)

        def killer() -> list[str]:
            return _kill(_children_named(int(pid), {"gcs_server", "raylet"}))

    elif name == "parsl":  # the owned HTEX's interchange
        from asyncflow.adapters.parsl import ParslExecutionBackend

        backend = ParslExecutionBackend(max_workers=2)

        def killer() -> list[str]:
            dfk = backend.dfk  # type: ignore[attr-defined]
            (htex,) = [e for e in dfk.executors.values() if e.label == "htex"]
            return _kill([psutil.Process(htex.interchange_proc.pid)])

    else:
        raise SystemExit(f"no runtime-loss scenario for {name}")

    result: dict[str, Any] = {"backend": name, "target": target}
    flow = WorkflowEngine(backend)
    outcomes = _Outcomes()
    async with Gate() as gate:
        await asyncio.wait_for(flow.start(), 120)
        hold = flow.function_task(t.gate_wait)
        inc, pack = flow.function_task(t.inc), flow.function_task(t.pack)
        running = [hold(gate.address, "held", 300) for _ in range(2)]
        await asyncio.wait_for(gate.arrived("held", 2), 60)
        queued = [inc(i) for i in range(20)]
        waiting = [pack(running[i % 2], i) for i in range(10)]
        await asyncio.sleep(0.5)  # let the queued ones reach the runtime
        futures = {
            **{f"running{i}": f for i, f in enumerate(running)},
            **{f"queued{i}": f for i, f in enumerate(queued)},
            **{f"waiting{i}": f for i, f in enumerate(waiting)},
        }
        result["finished_before"] = [k for k, f in futures.items() if f.done()]
        outcomes.start = time.monotonic()
        result["killed"] = killer()
        note(f"killed {result['killed']}")
        for label, fut in futures.items():
            outcomes.watch(label, fut)
        everything = asyncio.gather(*futures.values(), return_exceptions=True)
        result["all_failed_in"] = await _bounded(everything, 90)
        result["pending"] = [k for k, f in futures.items() if not f.done()]
        result["outcomes"] = outcomes.ended
        if name == "parsl":
            result["after"] = await _after_loss(flow, backend)
        note(f"futures: {len(result['pending'])} pending; shutting down")
        result["shutdown_in"] = await _bounded(flow.shutdown(), 60)
        note(f"shutdown: {result['shutdown_in']}")
    result["processes_left"] = left_after(10.0)
    return result


def ray_head() -> None:
    """Keep an owned local Ray up for attached drivers: print its address, then
    wait until stdin closes."""
    backend = owned("ray")

    class Null:
        def set_result(self, uid: str, value: Any) -> None: ...
        def set_exception(self, uid: str, exc: BaseException) -> None: ...
        def set_running(self, uid: str) -> None: ...

    async def up() -> str:
        await backend.start(Null())
        return str(backend.address)  # type: ignore[attr-defined]

    address = asyncio.run(up())
    # What an attaching driver needs to authenticate (the backend set them).
    auth = {k: v for k, v in os.environ.items() if k.startswith("RAY_AUTH_")}
    print(json.dumps({"address": address, "auth": auth}), flush=True)
    sys.stdin.read()
    asyncio.run(backend.shutdown())


# -- soak ---------------------------------------------------------------------------
def _fd_targets() -> set[str]:
    """What this process's descriptors point at (sockets and pipes by inode)."""
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            found.add(os.readlink(f"/proc/self/fd/{fd}"))
    return found


async def soak_scenario(name: str, total: int) -> dict[str, Any]:
    me = psutil.Process()
    async with WorkflowEngine(owned(name)) as flow:
        inc = flow.function_task(t.inc)
        # Warm: workers, connections, caches and the first batches exist, on
        # the runtime's own path (every worker runs tasks) and in chunks.
        alone = flow.function_task(chunk=False)(t.inc)
        assert sum(await asyncio.gather(*(alone(i) for i in range(200)))) > 0
        assert sum(await asyncio.gather(*(inc(i) for i in range(2000)))) > 0
        gc.collect()
        rss, fds, held = me.memory_info().rss, me.num_fds(), _fd_targets()
        begin = time.monotonic()
        batch = 2000
        for start in range(0, total, batch):
            futs = [inc(i) for i in range(start, start + batch)]
            assert sum(await asyncio.gather(*futs)) == sum(
                range(start + 1, start + batch + 1)
            )
            del futs
            note(f"{start + batch} tasks, {time.monotonic() - begin:.1f} s")
            if start + batch == total // 2:
                # Counted again half-way: connection pools that grow with the
                # load once are not leaks; what grows with the tasks is.
                gc.collect()
                rss, fds, held = me.memory_info().rss, me.num_fds(), _fd_targets()
        took = time.monotonic() - begin
        gc.collect()
        await asyncio.sleep(1)  # let the runtime release what it was told to
        gc.collect()
        return {
            "backend": name,
            "tasks": total,
            "seconds": round(took, 1),
            "grown_mb": (me.memory_info().rss - rss) / 2**20,
            "fds_before": fds,
            "fds_after": me.num_fds(),
            "fds_new": sorted(_fd_targets() - held),
            "open": len(flow._state.open),
            "inflight": len(flow._state.inflight),
        }


async def big_output_scenario(name: str, mib: int) -> dict[str, Any]:
    """A command printing ``mib`` MiB: how much it raises the driver's peak RSS
    (the figure a machine's memory limit cares about)."""
    import resource

    def peak_mb() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    async with WorkflowEngine(owned(name)) as flow:
        small = flow.executable_task(lambda: "echo ok")
        shout = flow.executable_task(
            lambda: f"head -c {mib * 2**20} /dev/zero | tr '\\0' x"
        )
        assert await small() == "ok\n"  # warm: workers and their connections
        gc.collect()
        before = peak_mb()
        out = await shout()
        grown = peak_mb() - before
        return {
            "backend": name,
            "printed_mb": mib,
            "value": type(out).__name__,
            "size": getattr(out, "size", None),
            "peak_growth_mb": round(grown, 1),
        }


async def big_value_scenario(name: str, mib: int) -> dict[str, Any]:
    """A function returning ``mib`` MiB, awaited in the driver and passed to a
    dependent: what each backend does with it, and how long it takes."""
    import resource

    async with WorkflowEngine(owned(name)) as flow:
        make = flow.function_task(t.make_bytes)
        size = flow.function_task(t.nbytes)
        assert await size(await make(1)) == 1  # warm: workers, connections
        begin = time.monotonic()
        try:
            big = make(mib * 2**20)
            measured = await size(big)
            downstream = time.monotonic() - begin
            value = await big
        except Exception as exc:
            return {"backend": name, "error": f"{type(exc).__name__}: {exc}"}
        return {
            "backend": name,
            "mib": mib,
            "dependent_saw": measured,
            "driver_got": len(value),
            "to_dependent_s": round(downstream, 1),
            "total_s": round(time.monotonic() - begin, 1),
            "driver_peak_mb": round(
                resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            ),
        }


async def failing_chain_scenario(name: str, depth: int) -> dict[str, Any]:
    """A chain ``depth`` deep whose root fails: every hop must fail with the
    root's error, in time linear in the depth (no recursion, no rescans)."""
    from asyncflow import DependencyFailureError

    async with WorkflowEngine(owned(name)) as flow:
        boom = flow.function_task(t.boom)
        inc = flow.function_task(t.inc)
        begin = time.monotonic()
        futs = [boom("root")]
        for _ in range(depth - 1):
            futs.append(inc(futs[-1]))
        outcomes = await asyncio.gather(*futs, return_exceptions=True)
        took = time.monotonic() - begin
        dependents = sum(isinstance(o, DependencyFailureError) for o in outcomes)
        return {
            "backend": name,
            "depth": depth,
            "root": type(outcomes[0]).__name__,
            "dependents_failed": dependents,
            "seconds": round(took, 2),
        }


def main(argv: list[str]) -> None:
    scenario, name, *rest = argv
    if os.environ.get("AFR_DUMP_AFTER"):  # debugging a hang: where is everyone?
        import faulthandler

        faulthandler.dump_traceback_later(float(os.environ["AFR_DUMP_AFTER"]))
    if scenario == "ray-head":
        ray_head()
        return
    if scenario == "shutdown":
        result = asyncio.run(shutdown_scenario(name))
    elif scenario == "ray-late-completion":
        result = asyncio.run(ray_late_completion())
    elif scenario == "shutdown-command":
        result = asyncio.run(shutdown_scenario(name, load=False))
    elif scenario == "runtime-loss":
        result = asyncio.run(runtime_loss_scenario(name, rest[0]))
    elif scenario == "soak":
        result = asyncio.run(soak_scenario(name, int(rest[0])))
    elif scenario == "big-value":
        result = asyncio.run(big_value_scenario(name, int(rest[0])))
    elif scenario == "failing-chain":
        result = asyncio.run(failing_chain_scenario(name, int(rest[0])))
    elif scenario == "big-output":
        result = asyncio.run(big_output_scenario(name, int(rest[0])))
    else:
        raise SystemExit(f"unknown scenario {scenario}")
    emit(result)
    note("done")
    # Whatever the runtime left behind must not keep this driver alive.
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        main(sys.argv[1:])
    except BaseException:
        import traceback

        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)  # never wait for a runtime's threads
