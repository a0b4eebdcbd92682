"""The radical.pilot reliability scenarios: one driver, one local pilot.

``python radical_driver.py`` starts a ``RadicalExecutionBackend({'resource':
'local.localhost'})`` (a pilot takes about a minute to start here), then runs
three steps on it in sequence and prints one JSON line, as ``drivers.py`` does:

``task_killed``
    an executable and a function task block on a :class:`Gate`; their processes
    are SIGKILLed from outside; both futures must fail, then new tasks must run;
``shutdown_load``
    a second backend attached to the same pilot gets 1,000 tasks (2 executables
    running, 798 ``/bin/true`` and 200 functions queued) and is shut down; its
    tasks must leave the shared pilot;
``pilot_killed``
    the last step, as it destroys the pilot: with tasks running (held at the
    gate), queued (held too, should they get a core) and waiting on the running
    ones, every process working under the pilot's sandbox (the agent, its
    components, raptor and the tasks) is SIGKILLed; every unfinished future must
    fail, later submissions must fail at once, and the owning backend's
    shutdown must still return.

Afterwards nothing of the runtime may be left: no process, no file in the
private ``TMPDIR`` the test passes.  A step that raises is recorded (``error``)
and the next one still runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import psutil
from drivers import (
    _bounded,
    _Outcomes,
    describe,
    emit,
    left_after,
    note,
    wait_gone,
)

from asyncflow import WorkflowEngine
from asyncflow.conformance import Gate
from asyncflow.conformance import tasks as t

#: seconds a pilot may take to start under load (the adapter allows 600)
START = 700.0
#: seconds the raptor workers may take after that (RAPTOR_START_TIMEOUT + 60)
WARM = 360.0


def _true_command() -> list[str]:
    return ["/bin/true"]


def _echo_command() -> list[str]:
    return ["echo", "after"]


def _pending(backend: Any, limit: float) -> Awaitable[float | None]:
    """Seconds until radical.pilot's TaskManager holds every task of ``backend``
    in flight, or None: so that "queued" means queued in the pilot, not in the
    adapter's submit queue."""
    tmgr = backend.runtime.tmgr

    async def wait() -> None:
        while True:
            uids = [rec.rp_uid for rec in list(backend._records.values())]
            if all(uids) and set(uids) <= set(tmgr.list_tasks()):
                return
            await asyncio.sleep(0.1)

    return _bounded(wait(), limit)


def _outcome(fut: Any) -> list[Any]:
    if not fut.done():
        return ["pending", ""]
    if fut.cancelled():
        return ["CancelledError", ""]
    exc = fut.exception()
    if exc is None:
        return ["result", repr(fut.result())[:80]]
    return [type(exc).__name__, str(exc)[:400]]


# -- 1. a task's process dies ---------------------------------------------------------
async def task_killed(flow: WorkflowEngine) -> dict[str, Any]:
    res: dict[str, Any] = {}
    async with Gate() as gate:

        def doomed_command() -> list[str]:
            return gate.command("exec")

        exe = flow.executable_task(doomed_command)()
        fn = flow.function_task(t.gate_wait)(gate.address, "func", 600)
        (exe_pid,) = await asyncio.wait_for(gate.arrived("exec"), 120)
        (fn_pid,) = await asyncio.wait_for(gate.arrived("func"), 120)
        res["killed"] = describe([psutil.Process(exe_pid), psutil.Process(fn_pid)])
        outcomes = _Outcomes()
        os.kill(exe_pid, signal.SIGKILL)
        os.kill(fn_pid, signal.SIGKILL)
        note(f"killed the tasks' processes {exe_pid} and {fn_pid}")
        outcomes.watch("executable", exe)
        outcomes.watch("function", fn)
        both = asyncio.gather(exe, fn, return_exceptions=True)
        res["failed_in"] = await _bounded(both, 60)
        res["outcomes"] = outcomes.ended
        exc = exe.exception() if exe.done() and not exe.cancelled() else None
        res["exit_code"] = getattr(exc, "exit_code", None)
        # the rest of the workflow goes on: both kinds of task still run
        after = [
            flow.function_task(t.inc)(41),
            flow.executable_task(_echo_command)(),
        ]
        res["after_in"] = await _bounded(asyncio.gather(*after), 120)
        res["after"] = [_outcome(f) for f in after]
    return res


# -- 2. shutdown under load ------------------------------------------------------------
async def shutdown_load(runtime: Any) -> dict[str, Any]:
    from asyncflow.adapters.radical import RadicalExecutionBackend

    res: dict[str, Any] = {}
    backend = RadicalExecutionBackend(runtime=runtime)
    flow = WorkflowEngine(backend)
    await asyncio.wait_for(flow.start(), 60)
    async with Gate() as gate:

        def held_command() -> list[str]:
            return gate.command("held")

        running = [flow.executable_task(held_command)() for _ in range(2)]
        pids = await asyncio.wait_for(gate.arrived("held", 2), 120)
        true, inc = flow.executable_task(_true_command), flow.function_task(t.inc)
        queued = [true() for _ in range(798)] + [inc(i) for i in range(200)]
        futures = running + queued
        res["submitted_in"] = await _pending(backend, 120)
        res["finished_before"] = sum(f.done() for f in futures)
        res["returned_in"] = await _bounded(flow.shutdown(), 30)
        await asyncio.sleep(0)  # callbacks from radical.pilot's threads
        res["futures"] = len(futures)
        res["done"] = sum(f.done() for f in futures)
        res["cancelled"] = sum(f.cancelled() for f in futures)
        res["errors"] = sorted(
            {
                kind
                for f in futures
                if (kind := _outcome(f)[0]) not in ("result", "CancelledError")
            }
        )
        # Inside the gate: a held command still running blocks on it, not EOF.
        alive = wait_gone(_processes(pids), 30)
        res["held_left"] = describe(alive)

        async def drained() -> None:  # radical.pilot reported each task final
            routes = runtime.dispatcher.routes
            while any(r.backend is backend for r in list(routes.values())):
                await asyncio.sleep(0.2)

        res["drained_in"] = await _bounded(drained(), 90)
        res["routes_left"] = sum(
            r.backend is backend for r in list(runtime.dispatcher.routes.values())
        )
    return res


def _processes(pids: list[int]) -> list[psutil.Process]:
    out = []
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            out.append(psutil.Process(pid))
    return out


# -- 3. the pilot goes away ------------------------------------------------------------
def kill_pilot(sandbox: str) -> list[str]:
    """SIGKILL every process working under the pilot's sandbox, and their
    children, until none is left: the agent, its components, raptor, tasks (and
    the launcher radical.pilot's client watches, which then sees the pilot fail)."""
    from asyncflow.adapters.radical.reaper import working_under

    me = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
    killed: dict[int, str] = {}
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        procs: dict[int, psutil.Process] = {}
        for pid in working_under([sandbox], me):
            with contextlib.suppress(psutil.Error):
                root = psutil.Process(pid)
                procs[pid] = root
                procs.update((c.pid, c) for c in root.children(recursive=True))
        alive = [p for p in wait_gone(list(procs.values()), 0) if p.pid not in me]
        if not alive:
            break
        for p, text in zip(alive, describe(alive), strict=False):
            killed.setdefault(p.pid, text)
        # stopped first, so that no part of the pilot sees another die and
        # reports it (a task's exit code) before it dies itself
        for sig in (signal.SIGSTOP, signal.SIGKILL):
            for p in alive:
                with contextlib.suppress(psutil.Error):
                    p.send_signal(sig)
        time.sleep(0.1)
    return list(killed.values())


def pilot_sandbox(owner: Any) -> str:
    """The folder the pilot of backend ``owner`` and all its processes work in."""
    from asyncflow.adapters.radical._rp import ru

    return str(ru.Url(owner.runtime.pilot.pilot_sandbox).path).rstrip("/")


async def pilot_killed(flow: WorkflowEngine, owner: Any) -> dict[str, Any]:
    rt = owner.runtime
    sandbox = pilot_sandbox(owner)
    res: dict[str, Any] = {"sandbox": sandbox}
    async with Gate() as gate:

        def held_command() -> list[str]:
            return gate.command("p-exe")

        def queued_command() -> list[str]:  # never ends, if it gets a core
            return gate.command("p-queued")

        wait = flow.function_task(t.gate_wait)
        true, inc = flow.executable_task(_true_command), flow.function_task(t.inc)
        pack = flow.function_task(t.pack)
        # Both raptor slots busy, and the task cores the adapter counts: what
        # follows stays queued (the agent may find more cores on its node, so
        # the queued executables never end either).
        running = [flow.executable_task(held_command)() for _ in range(2)]
        running += [wait(gate.address, "p-fn", 600) for _ in range(2)]
        await asyncio.wait_for(gate.arrived("p-exe", 2), 120)
        await asyncio.wait_for(gate.arrived("p-fn", 2), 120)
        queued = [flow.executable_task(queued_command)() for _ in range(20)]
        queued += [inc(i) for i in range(10)]
        waiting = [pack(running[2 + i % 2], i) for i in range(10)]
        res["submitted_in"] = await _pending(owner, 60)
        futures = {
            **{f"running{i}": f for i, f in enumerate(running)},
            **{f"queued{i}": f for i, f in enumerate(queued)},
            **{f"waiting{i}": f for i, f in enumerate(waiting)},
        }
        res["finished_before"] = [k for k, f in futures.items() if f.done()]
        outcomes = _Outcomes()
        res["killed"] = kill_pilot(sandbox)
        note(f"killed the pilot: {len(res['killed'])} processes")
        for label, fut in futures.items():
            outcomes.watch(label, fut)
        everything = asyncio.gather(*futures.values(), return_exceptions=True)
        res["all_failed_in"] = await _bounded(everything, 90)
        res["pending"] = [k for k, f in futures.items() if not f.done()]
        res["outcomes"] = outcomes.ended
        res["broken"] = rt.broken
        res["pilot_state"] = str(rt.pilot.state)
        # later submissions fail at once
        late = [inc(1), true()]
        res["late_in"] = await _bounded(
            asyncio.gather(*late, return_exceptions=True), 10
        )
        res["late"] = [_outcome(f) for f in late]
        note("shutting down")
        res["shutdown_in"] = await _bounded(flow.shutdown(), 30)
        note(f"shutdown: {res['shutdown_in']}")
    return res


# -- the run --------------------------------------------------------------------------
async def _step(
    result: dict[str, Any], name: str, limit: float, run: Callable[[], Awaitable[Any]]
) -> None:
    note(f"{name}: start")
    try:
        result[name] = await asyncio.wait_for(run(), limit)
    except Exception as exc:
        result[name] = {"error": "".join(traceback.format_exception(exc))[-3000:]}
    note(f"{name}: end")


def _left_files(root: Path, skip: str | None) -> list[str]:
    """What is under ``root`` (but ``skip``), while the watchdog may still be
    deleting it: os.walk ignores what vanishes under it, Path.rglob does not."""
    out = []
    for top, dirs, files in os.walk(root):
        if skip:
            dirs[:] = [d for d in dirs if not os.path.join(top, d).startswith(skip)]
        out += [os.path.relpath(os.path.join(top, n), root) for n in dirs + files]
    return sorted(out)


def _mp_tempdir() -> str | None:
    config: dict[str, Any] = getattr(multiprocessing.current_process(), "_config", {})
    return config.get("tempdir")


async def radical_scenario() -> dict[str, Any]:
    from asyncflow.adapters.radical import RadicalExecutionBackend
    from asyncflow.adapters.radical.reaper import working_under

    tmp = Path(tempfile.gettempdir())
    result: dict[str, Any] = {"backend": "radical"}
    owner = RadicalExecutionBackend({"resource": "local.localhost"})
    rt = owner.runtime
    flow = WorkflowEngine(owner)
    roots: list[str] = []
    try:
        begin = time.monotonic()
        await asyncio.wait_for(flow.start(), START)
        result["pilot_active_in"] = time.monotonic() - begin
        assert rt.base
        roots = [rt.base, *rt._roots_extra]
        warm = asyncio.gather(
            flow.function_task(t.inc)(1), flow.executable_task(_true_command)()
        )
        assert await asyncio.wait_for(warm, WARM) == [2, ""]
        result["warm_in"] = time.monotonic() - begin
        note(f"pilot up and warm after {result['warm_in']:.1f} s")
        await _step(result, "task_killed", 300, lambda: task_killed(flow))
        await _step(result, "shutdown_load", 400, lambda: shutdown_load(rt))
        await _step(result, "pilot_killed", 300, lambda: pilot_killed(flow, owner))
    finally:
        result["final_shutdown_in"] = await _bounded(flow.shutdown(), 60)
    result["timings"] = rt.timings
    result["base_exists"] = bool(rt.base) and os.path.exists(str(rt.base))
    result["processes_left"] = left_after(10.0)
    result["working_under_left"] = working_under(roots, {os.getpid()})
    own = _mp_tempdir()  # this interpreter's, removed when it exits normally
    deadline = time.monotonic() + 30  # the watchdog deletes the sandboxes
    while True:
        files = _left_files(tmp, own)
        if not files or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    result["files_left"] = files[:20]
    return result


def main() -> None:
    if os.environ.get("AFR_DUMP_AFTER"):  # debugging a hang: where is everyone?
        import faulthandler

        faulthandler.dump_traceback_later(float(os.environ["AFR_DUMP_AFTER"]))
    emit(asyncio.run(radical_scenario()))
    note("done")
    sys.stdout.flush()
    os._exit(0)  # whatever radical.pilot left must not keep the driver alive


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        main()
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
