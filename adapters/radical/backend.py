"""The protocol adapter: asyncflow specs in, sink reports out.

Everything slow lives in :class:`~.runtime.RadicalRuntime`; this class only
decides, on the event loop and without a round trip, what radical.pilot could
never run (a task larger than the pilot, a function task with no raptor), and
turns radical.pilot's final task states into the results and exceptions every
other adapter reports, including complete stdout and stderr, which
``task.stdout`` truncates to 1024 characters.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ..._util import run_in_thread
from ...errors import (
    BackendError,
    EngineClosedError,
    ExecutableFailedError,
    OutputDecodeError,
    ResourceUnavailableError,
    TaskDefinitionError,
    WorkerLostError,
)
from ...output import Capture, collect, tail
from ...protocol import BackendInfo, Capabilities, Capability, CompletionSink
from ...spec import Resources, TaskSpec
from .._awaitable import AwaitableBackend
from ._rp import rp, ru
from .chunks import RadicalChunks
from .config import Layout
from .dispatch import Record
from .runtime import RadicalRuntime
from .worker import LOST, unpack_result

__all__ = ["RadicalExecutionBackend"]

C = Capability

_ABSENT = {
    "reports_running": "raptor reports a function task only when it ends (an "
    "executable's start is reported)",
    "cancel_running": "a raptor worker cannot stop a running function; it runs to "
    "the end and its result is dropped",
    "large_payloads": "arguments and results travel inside radical.pilot task "
    "messages, copied through half a dozen ZMQ components; keep them small or "
    "pass file paths",
    "pipeline": "a radical.pilot task gets its arguments when it is submitted and "
    "cannot refer to another task's pending result, so the engine submits a task "
    "once its inputs are in",
}

#: what a default pilot (raptor workers, two or more cores) supports
DEFAULT_CAPABILITIES = Capabilities.of(
    C.CANCEL_QUEUED,
    C.EXECUTABLES,
    C.FUNCTIONS,
    C.GPUS,
    C.KILL_EXECUTABLES,
    C.PARALLEL,
    C.RESOURCES,
    C.SERIALIZES,
    **_ABSENT,
)


class RadicalExecutionBackend(AwaitableBackend):
    """Runs tasks on a radical.pilot pilot.

    ``RadicalExecutionBackend({'resource': 'local.localhost'})`` starts a session
    and pilot in the background right away; the keys are the docs page's
    (``resource``, ``queue``, ``nodes``, ``cores_per_node``, ``gpus_per_node``,
    ``walltime`` in minutes, ``project``/``account``) or PilotDescription keys.
    ``'resource': 'slurm'`` is the Slurm cluster this host submits to: the
    pilot is one batch job of exactly the dict's partition, nodes, walltime and
    account, whose queue state is reported to the engine's event stream.
    Keyword options are :class:`RadicalRuntime`'s.  ``runtime=`` attaches to a
    running :class:`RadicalRuntime` instead, which this backend then never
    closes.

    ``resources={'cores': c, 'gpus': g, 'ranks': r}`` map to ``cores_per_rank``,
    ``gpus_per_rank`` and ``ranks`` (cores and GPUs are per rank).  Per task,
    ``options={'radical': {...}}`` adds TaskDescription keys such as ``pre_exec``.

    Many calls of one function in one batch travel several to a raptor task
    (see :mod:`.chunks`); ``chunking=False`` gives each its own.
    """

    CAPABILITIES = DEFAULT_CAPABILITIES

    def __init__(
        self,
        resources: Mapping[str, Any] | None = None,
        *,
        runtime: RadicalRuntime | None = None,
        chunking: bool = True,
        **options: Any,
    ):
        if runtime is None:
            self._runtime = RadicalRuntime(resources, **options)
            self._owns = True
            self._runtime.start()
        else:
            if resources is not None or options:
                raise TaskDefinitionError(
                    "RadicalExecutionBackend(runtime=...) attaches to a running "
                    "runtime; describe the pilot when creating the RadicalRuntime"
                )
            self._runtime = runtime
            self._owns = False
        self._sink: CompletionSink | None = None
        self._records: dict[str, Record] = {}
        self._closed = False
        self._info = self._make_info()
        self._chunks = RadicalChunks(
            self._runtime.dispatcher,
            self._runtime.layout.function_cores,
            self._lost,
            chunking,
        )

    @property
    def runtime(self) -> RadicalRuntime:
        return self._runtime

    def _make_info(self) -> BackendInfo:
        lay = self._runtime.layout
        caps = [C.CANCEL_QUEUED, C.EXECUTABLES, C.KILL_EXECUTABLES, C.RESOURCES]
        caps.append(C.GPUS)
        absent = dict(_ABSENT)
        if lay.function_cores:
            caps += [C.FUNCTIONS, C.SERIALIZES]
        else:
            absent["functions"] = "started with function_cores=0 (no raptor workers)"
            absent["serializes"] = "no function tasks"
        if min(lay.task_cores, lay.function_cores or lay.task_cores) >= 2:
            caps.append(C.PARALLEL)
        else:
            absent["parallel"] = "the pilot has a single core for tasks"
        return BackendInfo(
            name=f"radical-{lay.resource}",
            runtime="radical.pilot",
            runtime_version=rp.version,
            capabilities=Capabilities.of(*caps, **absent),
        )

    @property
    def info(self) -> BackendInfo:
        return self._info

    async def start(self, sink: CompletionSink) -> None:
        if self._closed:
            raise EngineClosedError("this RadicalExecutionBackend was shut down")
        self._sink = sink
        if self._runtime.slurm is not None:  # the pilot's queue state, reported
            self._runtime.slurm.attach(self, sink)
        ready = self._runtime.start()
        if not ready.done():
            # not asyncio.wrap_future: cancelling this await would cancel the
            # runtime's future, which other backends share
            loop = asyncio.get_running_loop()
            waiter: asyncio.Future[None] = loop.create_future()

            def wake(_: object) -> None:
                with contextlib.suppress(RuntimeError):  # the loop is closed
                    loop.call_soon_threadsafe(_resolve, waiter)

            ready.add_done_callback(wake)
            await waiter
        ready.result()
        self._chunks.start(sink)

    # -- submit ----------------------------------------------------------------------
    def submit(self, specs: Sequence[TaskSpec]) -> None:
        sink = self._sink
        assert sink is not None
        lay = self._runtime.layout
        accepted = []
        for spec in specs:
            why = self._refuse(spec, lay)
            if why is not None:
                sink.set_exception(spec.uid, why)
            else:
                accepted.append(spec)
        batch: list[Record] = []
        for spec in self._chunks.route(accepted):
            rec = Record(self, spec.uid, spec.name, spec.command, spec)
            self._records[spec.uid] = rec
            batch.append(rec)
        if batch:
            self._runtime.dispatcher.submit(batch)

    def _refuse(self, spec: TaskSpec, lay: Layout) -> BaseException | None:
        rt = self._runtime
        if self._closed:
            return EngineClosedError(f"task {spec.name!r}: the backend is shut down")
        if rt.broken:
            return WorkerLostError(f"task {spec.name!r}: {rt.broken}")
        if spec.command is None:
            if not lay.function_cores:
                return TaskDefinitionError(
                    f"task {spec.name!r}: this backend runs no function tasks "
                    "(function_cores=0)"
                )
            if rt.functions_broken:
                return WorkerLostError(f"task {spec.name!r}: {rt.functions_broken}")
        elif (
            spec.command.cwd is not None
            and lay.local
            and not os.path.isdir(spec.command.cwd)
        ):
            return TaskDefinitionError(
                f"executable task {spec.name!r}: cwd {spec.command.cwd!r} does not "
                "exist on the worker; create the directory first or fix the path"
            )
        if spec.resources.is_default:
            return None
        command = spec.command is not None
        return _check_resources(spec.name, spec.resources, command, lay)

    # -- completions (called by the dispatcher, on radical.pilot's threads) -----------
    def _deliver_running(self, rec: Record) -> None:
        if self._sink is not None and not rec.cancelled:
            self._sink.set_running(rec.uid)

    def _deliver_error(self, rec: Record, exc: BaseException) -> None:
        if self._records.pop(rec.uid, None) is not None and self._sink is not None:
            self._sink.set_exception(rec.uid, exc)

    def _deliver(self, rec: Record, task: Any, state: str) -> None:
        if rec.cancelled or self._records.pop(rec.uid, None) is None:
            return
        sink = self._sink
        assert sink is not None
        if rec.command is not None:
            self._deliver_command(rec, task, state, sink)
        elif state == rp.DONE:
            ok, value = unpack_result(rec.name, task.return_value)
            if ok:
                sink.set_result(rec.uid, value)
            else:
                sink.set_exception(rec.uid, value)
        else:
            sink.set_exception(rec.uid, self._lost(rec.name, task, state))

    def _lost(self, name: str, task: Any, state: str) -> BaseException:
        return _lost(name, task, state, self._runtime.pilot_lost)

    def _deliver_command(
        self, rec: Record, task: Any, state: str, sink: CompletionSink
    ) -> None:
        code = task.exit_code
        if state == rp.CANCELED or code is None:
            sink.set_exception(rec.uid, self._lost(rec.name, task, state))
            return
        assert rec.command is not None
        capture = rec.command.capture
        out, err = _streams(task, capture)
        if state == rp.DONE and code == 0:
            if out is None:  # no sandbox to read: what radical.pilot kept
                sink.set_result(rec.uid, task.stdout or "")
                return
            try:
                sink.set_result(rec.uid, collect(out, capture, rec.name, own=False))
            except OutputDecodeError as exc:
                sink.set_exception(rec.uid, exc)
            return
        # killed by a signal: by Slurm, if the pilot's job reached its walltime?
        gone = self._runtime.job_gone() if code < 0 or code > 128 else None
        if gone is not None:
            sink.set_exception(
                rec.uid,
                WorkerLostError(f"executable task {rec.name!r} was killed: {gone}"),
            )
            return
        texts = [
            tail(path, capture.limit) if path else (kept or "")
            for path, kept in ((out, task.stdout), (err, task.stderr))
        ]
        sink.set_exception(
            rec.uid,
            ExecutableFailedError(
                rec.name, int(code), texts[0], texts[1], rec.command.argv
            ),
        )

    # -- cancel and shutdown -----------------------------------------------------------
    def cancel(self, uids: Sequence[str]) -> None:
        uids = self._chunks.cancel(uids)
        records = [r for uid in uids if (r := self._records.pop(uid, None))]
        if records:
            self._runtime.dispatcher.cancel(records)

    async def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.cancel(list(self._records))
        self._chunks.close()
        if self._runtime.slurm is not None:
            self._runtime.slurm.detach(self)
        if self._owns:
            await run_in_thread(self._runtime.close, name="asyncflow-radical-close")


def _check_resources(
    name: str, res: Resources, command: bool, lay: Layout
) -> BaseException | None:
    check = _check_command if command else _check_function
    problem = check(name, res, lay)
    if problem is None and res.memory and lay.memory and res.memory > lay.memory:
        return ResourceUnavailableError(
            f"task {name!r} asks for {res.memory} MB, but the pilot has {lay.memory} MB"
        )
    return problem


def _check_command(name: str, res: Resources, lay: Layout) -> BaseException | None:
    """Executables get the cores and GPUs raptor leaves, ranks only with MPI."""
    where = (
        f"the pilot leaves {lay.task_cores} core(s) for executables "
        f"({lay.cores_per_node} per node), {lay.gpus} GPU(s)"
    )
    if res.ranks > 1 and not lay.mpi:
        return ResourceUnavailableError(
            f"task {name!r} asks for {res.ranks} MPI ranks, but no mpiexec or "
            "mpirun is on PATH here; install MPI or use ranks=1"
        )
    if (lay.task_cores and res.cores * res.ranks > lay.task_cores) or (
        lay.cores_per_node and res.cores > lay.cores_per_node
    ):
        return ResourceUnavailableError(
            f"task {name!r} asks for {res.cores} core(s) x {res.ranks} rank(s), "
            f"but {where}; lower the request or ask for a bigger pilot"
        )
    if res.gpus * res.ranks > lay.gpus:
        return ResourceUnavailableError(
            f"task {name!r} asks for {res.gpus} GPU(s) x {res.ranks} rank(s), "
            f"but {where}; add 'gpus_per_node' to the pilot description"
        )
    return None


def _check_function(name: str, res: Resources, lay: Layout) -> BaseException | None:
    """Functions run in one raptor worker slot: its cores, no GPUs, no ranks."""
    if res.ranks > 1 or res.gpus or res.cores > lay.worker_cores:
        return ResourceUnavailableError(
            f"task {name!r} asks for {res}, but function tasks run in raptor "
            f"workers with {lay.worker_cores} core(s) and no GPUs each; lower the "
            "request or make it an executable task"
        )
    return None


def _lost(
    name: str, task: Any, state: str, pilot_lost: Callable[[], str]
) -> BaseException:
    """What a task that did not run to an exit code becomes.

    A task radical.pilot failed because its pilot died gets the runtime's
    reason (a Slurm job's walltime, say), whether or not the runtime had
    noticed the pilot's end before this task's callback came.
    """
    detail = task.exception or ""
    if detail == LOST:  # its process died: AsyncflowWorker says how
        return WorkerLostError(f"task {name!r}: {task.exception_detail}")
    tail = (task.exception_detail or "").strip().splitlines()[-3:]
    text = f"{detail} {' | '.join(tail)}".strip() or "no detail"
    if "pilot" in text and ("died" in text or "final" in text):
        return WorkerLostError(f"task {name!r}: {pilot_lost()}")
    if state == rp.CANCELED:
        return WorkerLostError(
            f"task {name!r}: radical.pilot ended it as {state} ({text})"
        )
    return BackendError(f"task {name!r}: radical.pilot reports {state}: {text}")


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def _streams(task: Any, capture: Capture) -> tuple[str | None, str | None]:
    """The files a command's stdout and stderr went to (``None``: unknown, when
    radical.pilot gave no sandbox)."""
    try:
        sbox = ru.Url(task.sandbox).path
    except Exception:
        sbox = ""
    paths = []
    for given, suffix in ((capture.stdout, "out"), (capture.stderr, "err")):
        path = given or os.path.join(sbox, f"{task.uid}.{suffix}")
        paths.append(path if os.path.isfile(path) else None)
    return paths[0], paths[1]
