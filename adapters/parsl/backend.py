"""ParslExecutionBackend itself: its construction, start, cancel and shutdown.

The protocol's lifecycle lives here: choosing the runtime (the default local
HTEX, the page's HPC dict translated by ``slurm``, a Config to load, or a
loaded DataFlowKernel to attach to), declaring what the chosen executors can do,
watching that their HTEX interchanges still run (and, for the dict, that its
Slurm job still does), cancelling tasks (through ``cancel``) and releasing the
DFK at shutdown.
Submission and results are the mixins it is built from (``submit``,
``results``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from concurrent.futures import InvalidStateError
from typing import Any

import parsl
from parsl.config import Config
from parsl.dataflow.dflow import DataFlowKernel
from parsl.executors.errors import BadStateException

from ..._util import run_in_thread
from ...errors import EngineClosedError, TaskDefinitionError, WorkerLostError
from ...hpc import is_allocation
from ...protocol import BackendInfo, Capabilities, Capability, CompletionSink
from ...worker import pid_dir_under
from .._awaitable import AwaitableBackend
from .base import _InterchangeLost, _Task, log
from .cancel import _INPROC_CANCELLED, _kill_here
from .config import local_htex_config
from .executors import _Profile
from .results import _ResultsMixin
from .runtime import _dead_interchanges, _Runtime
from .slurm import SlurmBlocks
from .submit import _SubmitMixin

C = Capability
_tokens = itertools.count(1)
_NO_GPUS = "no accelerators configured (available_accelerators)"
#: How often a backend checks that the HTEX interchanges it uses still run.
_WATCH_PERIOD = 0.5


#: What ``ParslExecutionBackend()`` (the local HTEX) declares; other configs vary.
DEFAULT_CAPABILITIES = Capabilities.of(
    C.CANCEL_QUEUED,
    C.CANCEL_RUNNING,
    C.EXECUTABLES,
    C.FUNCTIONS,
    C.KILL_EXECUTABLES,
    C.LARGE_PAYLOADS,
    C.PARALLEL,
    C.RESOURCES,
    C.SERIALIZES,
    gpus=_NO_GPUS,
    reports_running="Parsl tells the driver only how a task ended",
)


class ParslExecutionBackend(_SubmitMixin, _ResultsMixin, AwaitableBackend):
    """Runs tasks through a Parsl DataFlowKernel.

    * ``ParslExecutionBackend()``: a local HighThroughputExecutor with
      ``max_workers`` workers on 127.0.0.1 and a temporary run directory, all
      removed at shutdown.
    * ``ParslExecutionBackend({'resource': 'slurm', 'queue': ..., 'nodes': ...,
      'cores_per_node': ..., 'gpus_per_node': ..., 'walltime': minutes,
      'account': ...})``: the reference page's HPC dict, one Slurm job of
      ``nodes`` nodes running HTEX workers (see ``asyncflow.adapters.parsl.slurm``
      for the mapping); the job is cancelled and its run directory removed at
      shutdown.
    * ``ParslExecutionBackend(config)``: loads any ``parsl.config.Config`` (Slurm,
      PBS, ... through Parsl's providers) and cleans that DFK up at shutdown.
    * ``ParslExecutionBackend(dfk)``: attaches to a loaded ``DataFlowKernel``,
      which is left running.

    Tasks go to ``executor`` (default: the config's first executor); a task may
    pick another with ``options={"executor": "label"}``.
    :meth:`per_executor` gives one backend per executor instead, for
    ``WorkflowEngine({...})`` and ``backend="label"``.
    ``options={"parsl_resource_specification": {...}}`` is passed to Parsl as is
    (merged over what ``resources=`` translates to).
    """

    #: for listings that must not start a runtime (``asyncflow backends``)
    CAPABILITIES = DEFAULT_CAPABILITIES

    def __init__(
        self,
        config: Config | DataFlowKernel | Mapping[str, Any] | None = None,
        *,
        executor: str | None = None,
        max_workers: int = 2,
        kill_running_functions: bool = True,
        wait_for_workers: float | None = None,
        _runtime: _Runtime | None = None,
    ):
        runtime = (
            _runtime
            if _runtime is not None
            else _runtime_for(config, max_workers, wait_for_workers)
        )
        self._runtime = runtime
        self._profiles = {e.label: _Profile(e) for e in runtime.executors}
        if not self._profiles:
            raise TaskDefinitionError("the Parsl configuration has no executor")
        if executor is None:
            executor = next(iter(self._profiles))
        elif executor not in self._profiles:
            raise TaskDefinitionError(
                f"Parsl executor {executor!r} is not in the configuration; it has "
                f"{sorted(self._profiles)}"
            )
        self._label = executor
        if runtime.batch is not None:
            advice = "the allocation dict asks for none: set 'gpus_per_node'"
            self._profiles[executor].advice = advice
        self._routable = _runtime is None  # per_executor() backends stay put
        self._kill_functions = kill_running_functions
        self._token = f"af{os.getpid()}x{next(_tokens)}"
        self._counter = itertools.count()
        self._tasks: dict[str, _Task] = {}
        self._cancelled: dict[str, _Task] = {}  # until Parsl reports them done
        self._pickled: dict[Any, bytes] = {}
        self._sink: CompletionSink | None = None
        self._dfk: DataFlowKernel | None = None
        self._start_job: asyncio.Future[None] | None = None
        self._watch: asyncio.TimerHandle | None = None
        self._started = False
        self._closed = False
        self._info = self._describe()

    @classmethod
    def per_executor(
        cls, config: Config | DataFlowKernel | Mapping[str, Any], **kwargs: Any
    ) -> dict[str, ParslExecutionBackend]:
        """One backend per executor label, sharing one DFK (cleaned up, if it was
        loaded here, when the last of them shuts down)."""
        if is_allocation(config):  # the page's dict: one executor
            backend = cls(config, **kwargs)
            return {backend._label: backend}
        if isinstance(config, DataFlowKernel):
            runtime = _Runtime(None, config, None, None)
        else:
            assert isinstance(config, Config)
            runtime = _Runtime(config, None, None, kwargs.pop("wait_for_workers", None))
        return {
            e.label: cls(None, executor=e.label, _runtime=runtime, **kwargs)
            for e in runtime.executors
        }

    # -- description -----------------------------------------------------------
    def _describe(self) -> BackendInfo:
        scope = (
            list(self._profiles.values())
            if self._routable
            else [self._profiles[self._label]]
        )
        caps = {C.FUNCTIONS, C.EXECUTABLES, C.LARGE_PAYLOADS}
        absent: dict[str, str] = {
            "reports_running": "Parsl tells the driver only how a task ended"
        }
        if sum(p.slots for p in scope) >= 2:
            caps.add(C.PARALLEL)
        else:
            absent["parallel"] = "the executor has a single worker slot"
        if all(p.in_process for p in scope):
            absent["serializes"] = "Parsl's ThreadPoolExecutor runs tasks in the driver"
        elif not any(p.in_process for p in scope):
            caps.add(C.SERIALIZES)
        else:
            absent["serializes"] = "some executors run tasks in the driver process"
        if all(p.local for p in scope):
            caps.update((C.KILL_EXECUTABLES, C.CANCEL_QUEUED))
        else:
            absent["cancel_queued"] = (
                "Parsl cannot take back a task its interchange holds, and the "
                "cancel marks of workers on other hosts are out of the driver's reach"
            )
            absent["kill_executables"] = (
                "AppFuture.cancel is not implemented in Parsl and workers on other "
                "hosts are out of the driver's reach; the engine abandons the task"
            )
        if all(p.local and not p.in_process for p in scope) and self._kill_functions:
            caps.add(C.CANCEL_RUNNING)
        elif any(p.in_process for p in scope):
            absent["cancel_running"] = (
                "a running Parsl ThreadPoolExecutor thread "
                "cannot be interrupted; its result is dropped"
            )
        else:
            absent["cancel_running"] = (
                "AppFuture.cancel is not implemented in Parsl; the worker cannot be "
                "reached (remote) or killing it was disabled"
            )
        if all(p.checks() for p in scope):
            caps.add(C.RESOURCES)
        else:
            absent["resources"] = "an executor takes no resource specification"
        if all(p.gpus != 0 for p in scope):
            caps.add(C.GPUS)
        else:
            absent["gpus"] = _NO_GPUS
        profile = self._profiles[self._label]
        return BackendInfo(
            name=f"parsl-{self._label}",
            runtime=f"parsl {profile.kind}",
            runtime_version=parsl.__version__,
            capabilities=Capabilities.of(
                *sorted(caps, key=lambda c: c.value), **absent
            ),
        )

    @property
    def info(self) -> BackendInfo:
        return self._info

    @property
    def dfk(self) -> DataFlowKernel | None:
        """The DataFlowKernel, once started."""
        return self._runtime.dfk if self._started else None

    # -- lifecycle ---------------------------------------------------------------
    async def start(self, sink: CompletionSink) -> None:
        if self._closed:
            raise EngineClosedError("this ParslExecutionBackend was shut down")
        self._sink = sink
        batch = self._runtime.batch
        if batch is not None and self._start_job is None:
            state = getattr(sink, "set_backend_state", None)
            batch.connect(
                None if state is None else lambda s, d: state(self, s, d),
                self._jobs_lost,
            )
        if self._start_job is None:
            # Shielded: if the engine gives up waiting, shutdown() still knows
            # whether the DFK came up and must be released.
            self._start_job = asyncio.ensure_future(
                run_in_thread(self._runtime.acquire, name="asyncflow-parsl-start")
            )
        await asyncio.shield(self._start_job)
        self._dfk = self._runtime.dfk
        self._started = True
        if self._watch is None and any(p.htex for p in self._profiles.values()):
            loop = asyncio.get_running_loop()
            self._watch = loop.call_later(_WATCH_PERIOD, self._check_interchanges)

    def _check_interchanges(self) -> None:
        """Parsl does not notice when an HTEX interchange dies: its tasks would
        wait forever.  Mark such an executor bad, which fails every task it
        holds (and any later one) with WorkerLostError."""
        self._watch = None
        dfk = self._dfk
        if self._closed or dfk is None or dfk.cleanup_called:
            return
        for ex, code in _dead_interchanges(dfk):
            if ex.label not in self._profiles or ex.bad_state_is_set:
                continue
            err = _InterchangeLost(
                f"the interchange of Parsl executor {ex.label!r} exited (code "
                f"{code}), so the executor can run no more tasks; start a new "
                "backend"
            )
            try:
                ex.set_bad_state_and_fail_all(err)
            except Exception:  # its task table changed under us: try again
                log.warning("could not fail the tasks of %s", ex.label, exc_info=True)
                continue
        loop = asyncio.get_running_loop()
        self._watch = loop.call_later(_WATCH_PERIOD, self._check_interchanges)

    def _jobs_lost(self, message: str) -> None:
        """The Slurm job holding this backend's workers ended under it (walltime,
        node failure, someone's ``scancel``; called from the job watch thread).
        Parsl starts no new block here, so its tasks would wait forever: fail
        every unfinished one now, and mark the executor bad so that later ones
        fail at once too."""
        if self._closed:
            return
        hint = "ask for a longer 'walltime' and " if "walltime" in message else ""
        err = _InterchangeLost(
            f"{message}; Parsl executor {self._label!r} can run no more tasks: "
            f"{hint}start a new backend"
        )
        batch = self._runtime.batch
        ex = batch.executor if batch is not None and self._runtime.dfk else None
        if ex is not None and not ex.bad_state_is_set:
            try:
                ex.set_bad_state_and_fail_all(err)
            except RuntimeError:  # its task table changed under us: once more
                for fut in list(ex.tasks.values()):
                    with contextlib.suppress(InvalidStateError):
                        fut.set_exception(BadStateException(ex, err))
        sink = self._sink
        for uid in list(self._tasks):
            task = self._tasks.pop(uid, None)
            if task is not None and sink is not None:
                sink.set_exception(uid, WorkerLostError(f"task {task.name!r}: {err}"))

    async def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        job = self._start_job
        if job is None:
            runtime = self._runtime
            if runtime.owned and runtime.users == 0 and runtime.dfk is None:
                runtime._discard()  # never started: only the temp dir exists
            return
        try:
            await asyncio.shield(job)
        except BaseException:
            return  # the DFK never came up; acquire() cleaned up after itself
        self.cancel(list(self._tasks))
        self._pickled.clear()
        await run_in_thread(self._runtime.release, name="asyncflow-parsl-shutdown")

    # -- cancellation ------------------------------------------------------------
    def cancel(self, uids: Sequence[str]) -> None:
        tasks = self._tasks
        cancelled = self._cancelled
        mark: list[str] = []
        kill: list[str] = []
        inproc: list[str] = []
        for uid in uids:
            task = tasks.pop(uid, None)
            if task is None:
                continue
            cancelled[uid] = task
            profile = self._profiles[task.label]
            if profile.in_process:
                inproc.append(task.key)
            elif profile.local:
                mark.append(task.key)
                if task.command or self._kill_functions:
                    kill.append(task.key)
        if inproc:
            _INPROC_CANCELLED.update(inproc)
            _kill_here(inproc, functions=False)  # threads cannot be killed
        control = self._runtime.control
        if mark and control is not None:
            control.cancel(mark, kill)

    def _forget(self, uid: str) -> None:
        """A cancelled task finally ended in Parsl: drop its marker."""
        task = self._cancelled.pop(uid, None)
        if task is None:
            return
        if self._profiles[task.label].in_process:
            _INPROC_CANCELLED.discard(task.key)
        else:
            control = self._runtime.control
            if control is not None:
                control.forget([task.key])


def _runtime_for(
    config: Config | DataFlowKernel | Mapping[str, Any] | None,
    max_workers: int,
    wait_for_workers: float | None,
) -> _Runtime:
    """The runtime a ``ParslExecutionBackend(config)`` runs on: the default local
    HTEX, a loaded DFK, a Config, or the page's HPC dict translated by ``slurm``."""
    if config is None:
        tmpdir = tempfile.mkdtemp(prefix="asyncflow-parsl-")
        worker_tmp = os.path.join(tmpdir, "tmp")
        try:
            cfg = local_htex_config(
                os.path.join(tmpdir, "runinfo"),
                max_workers=max_workers,
                # unix socket paths below it must stay under 108 bytes
                worker_tmpdir=worker_tmp if len(worker_tmp) <= 60 else None,
                command_pids=pid_dir_under(tmpdir),
            )
        except BaseException:
            shutil.rmtree(tmpdir, ignore_errors=True)
            raise
        return _Runtime(
            cfg,
            None,
            tmpdir,
            60.0 if wait_for_workers is None else wait_for_workers,
        )
    if isinstance(config, DataFlowKernel):
        if config.cleanup_called:
            raise TaskDefinitionError("this Parsl DataFlowKernel was cleaned up")
        return _Runtime(None, config, None, None)
    if isinstance(config, Config):
        return _Runtime(config, None, None, wait_for_workers)
    if is_allocation(config):
        assert isinstance(config, Mapping)
        batch = SlurmBlocks(config)
        return _Runtime(batch.config, None, None, wait_for_workers, batch=batch)
    raise TaskDefinitionError(
        "ParslExecutionBackend takes the page's HPC dict ({'resource': "
        "'slurm', ...}), a parsl.config.Config, a loaded DataFlowKernel or "
        f"nothing, got {type(config).__name__}"
    )
