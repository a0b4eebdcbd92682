"""ParslExecutionBackend itself: the protocol class over its collaborators.

The backend chooses the runtime (``runtime.runtime_for``: the default local
HTEX, the page's HPC dict translated by ``slurm``, a Config to load, or a
loaded DataFlowKernel to attach to), declares what the chosen executors can do
(``executors.describe``) and owns one :class:`~.state.State` that its
collaborators share: the :class:`~.submit.Submitter`, the
:class:`~.results.Completions`, the :class:`~.cancel.Canceller` and the
:class:`~.results.Watch`.  The protocol's lifecycle stays here: starting the DFK
off the loop, and releasing it at shutdown.
"""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import Mapping, Sequence
from typing import Any

from parsl.config import Config
from parsl.dataflow.dflow import DataFlowKernel

from ..._util import run_in_thread
from ...errors import TaskDefinitionError
from ...hpc import is_allocation
from ...protocol import BackendInfo, CompletionSink
from ...spec import TaskSpec
from .._awaitable import AwaitableBackend
from ..toolkit import Lifecycle
from .cancel import Canceller
from .chunks import ParslChunks
from .executors import DEFAULT_CAPABILITIES, Profile, describe
from .results import Completions, Watch
from .runtime import Runtime, runtime_for
from .state import State, log
from .submit import Submitter

_tokens = itertools.count(1)


class ParslExecutionBackend(AwaitableBackend):
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

    On an HTEX, many calls of one function in one batch travel several to a
    Parsl task, and a chain called in one go runs on inside one worker (see
    :mod:`.chunks`).  ``chunking=False`` sends every task as a Parsl task of
    its own: for a workflow that relies on each task's Parsl identity (its
    task record, monitoring, per-task worker logs), or whose short tasks must
    each stop at once when cancelled, which a chunk-mate does only when its
    whole chunk is cancelled.
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
        chunking: bool = True,
        _runtime: Runtime | None = None,
    ):
        runtime = (
            _runtime
            if _runtime is not None
            else runtime_for(config, max_workers, wait_for_workers)
        )
        profiles = {e.label: Profile(e) for e in runtime.executors}
        label = _label(profiles, executor)
        if runtime.batch is not None:
            advice = "the allocation dict asks for none: set 'gpus_per_node'"
            profiles[label].advice = advice
        self._life = Lifecycle(type(self).__name__, log)
        self._state = state = State(
            runtime=runtime,
            profiles=profiles,
            label=label,
            routable=_runtime is None,  # per_executor() backends stay put
            kill_functions=kill_running_functions,
            life=self._life,
            token=f"af{os.getpid()}x{next(_tokens)}",
        )
        self._canceller = Canceller(state)
        self._submitter = Submitter(
            state, Completions(state, self._canceller.forget).done
        )
        self._watch = Watch(state)
        self._chunks = ParslChunks(state, chunking)
        self._start_job: asyncio.Future[None] | None = None
        self._info = describe(
            profiles,
            label,
            state.routable,
            kill_running_functions,
            chunked=self._chunks.enabled,
        )

    @classmethod
    def per_executor(
        cls, config: Config | DataFlowKernel | Mapping[str, Any], **kwargs: Any
    ) -> dict[str, ParslExecutionBackend]:
        """One backend per executor label, sharing one DFK (cleaned up, if it was
        loaded here, when the last of them shuts down)."""
        if is_allocation(config):  # the page's dict: one executor
            backend = cls(config, **kwargs)
            return {backend._state.label: backend}
        if isinstance(config, DataFlowKernel):
            runtime = Runtime(None, config, None, None)
        else:
            assert isinstance(config, Config)
            runtime = Runtime(config, None, None, kwargs.pop("wait_for_workers", None))
        return {
            e.label: cls(None, executor=e.label, _runtime=runtime, **kwargs)
            for e in runtime.executors
        }

    @property
    def info(self) -> BackendInfo:
        return self._info

    @property
    def dfk(self) -> DataFlowKernel | None:
        """The DataFlowKernel, once started."""
        return self._state.dfk

    # -- lifecycle ---------------------------------------------------------------
    async def start(self, sink: CompletionSink) -> None:
        self._life.begin_start()
        state = self._state
        state.sink = sink
        batch = state.runtime.batch
        if batch is not None:
            report = getattr(sink, "set_backend_state", None)
            batch.connect(
                None if report is None else lambda s, d: report(self, s, d),
                self._watch.jobs_lost,
            )
        # Shielded: if the engine gives up waiting, shutdown() still knows
        # whether the DFK came up and must be released.
        self._start_job = asyncio.ensure_future(
            run_in_thread(state.runtime.acquire, name="asyncflow-parsl-start")
        )
        await asyncio.shield(self._start_job)
        state.dfk = state.runtime.dfk
        self._chunks.start(sink)
        if not self._life.closed and any(p.htex for p in state.profiles.values()):
            self._life.spawn(self._watch.interchanges())

    def submit(self, specs: Sequence[TaskSpec]) -> list[str]:
        rest, refused = self._chunks.route(specs)
        if rest:
            self._submitter.submit(rest)
        return refused

    def cancel(self, uids: Sequence[str]) -> None:
        self._canceller.cancel(self._chunks.cancel(uids))

    async def shutdown(self) -> None:
        if not self._life.begin_shutdown():
            return
        await self._life.cancel_background()
        state = self._state
        job = self._start_job
        if job is None:
            runtime = state.runtime
            if runtime.owned and runtime.users == 0 and runtime.dfk is None:
                runtime.discard()  # never started: only the temp dir exists
            return
        try:
            await asyncio.shield(job)
        except BaseException:
            return  # the DFK never came up; acquire() cleaned up after itself
        self._chunks.close()
        self._canceller.cancel(list(state.tasks))
        self._submitter.functions.clear()
        await run_in_thread(state.runtime.release, name="asyncflow-parsl-shutdown")


def _label(profiles: dict[str, Profile], executor: str | None) -> str:
    """The executor a backend sends its tasks to unless options name another."""
    if not profiles:
        raise TaskDefinitionError("the Parsl configuration has no executor")
    if executor is None:
        return next(iter(profiles))
    if executor not in profiles:
        raise TaskDefinitionError(
            f"Parsl executor {executor!r} is not in the configuration; it has "
            f"{sorted(profiles)}"
        )
    return executor
