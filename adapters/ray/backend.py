"""RayExecutionBackend itself: the protocol, handed to its collaborators.

The backend owns one :class:`~.state.RayState` and the parts that share it:
the process owner (``process``), the submitter (``submit``), the completions
and fetches (``results``), the canceller (``cancel``) and the head watch
(``watch``).  What is left here is the order in which they are started and
shut down.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Any

import ray

from ... import _signals
from ...protocol import BackendInfo, CompletionSink
from ...spec import TaskSpec
from .._awaitable import AwaitableBackend
from ..toolkit import Lifecycle
from .cancel import Canceller
from .chunks import RayChunks
from .process import RayProcess, usable_cpus
from .results import Completions
from .state import DEFAULT_CAPABILITIES, RayState, describe, log
from .submit import Submitter
from .watch import HeadWatch

__all__ = ["RayExecutionBackend"]


class RayExecutionBackend(AwaitableBackend):
    """Runs tasks on Ray.

    ``RayExecutionBackend()`` starts a local Ray (``num_cpus`` defaults to the
    CPUs this process may use, dashboard and usage stats off, a private temp dir,
    listening on 127.0.0.1 only) and shuts it down again at ``shutdown()``.
    ``RayExecutionBackend(address="auto" | "ray://host:10001" | "host:6379")``
    attaches to a running cluster and leaves it running.  Other keywords go to
    ``ray.init``.  If Ray is already initialised in this process, the backend
    uses that connection and never shuts it down.

    ``fail_infeasible=False`` lets tasks wait for resources no node has yet (an
    autoscaling cluster may add them); by default such a task fails at once with
    :class:`~asyncflow.ResourceUnavailableError`.  ``loopback=False`` lets a
    local Ray bind to the machine's external address, as Ray does by default.
    Per task, ``options={"ray": {...}}`` passes extra Ray task options such as
    ``runtime_env`` or ``scheduling_strategy``.

    Many calls of one function in one batch travel several to a Ray task (see
    :mod:`.chunks`); ``chunking=False`` sends every task as a Ray task of its
    own, for a workflow that relies on each task's Ray identity.
    """

    CAPABILITIES = DEFAULT_CAPABILITIES

    def __init__(
        self,
        address: str | None = None,
        *,
        fail_infeasible: bool = True,
        loopback: bool = True,
        chunking: bool = True,
        **init_kwargs: Any,
    ):
        state = self._state = RayState(
            address=address,
            init_kwargs=dict(init_kwargs),
            fail_infeasible=fail_infeasible,
            loopback=loopback and address is None,
            life=Lifecycle(type(self).__name__, log),
            info=describe(address, 2, 0, "not known until attached"),
        )
        if address is None and not ray.is_initialized():
            cpus = init_kwargs.get("num_cpus") or usable_cpus()
            state.init_kwargs["num_cpus"] = cpus
            gpus = init_kwargs.get("num_gpus") or 0
            state.info = describe(
                address, cpus, gpus, "not known until Ray has started"
            )
        elif ray.is_initialized():
            state.read_cluster()
        self._process = RayProcess(state)
        self._chunks = RayChunks(state, chunking)
        self._completions = Completions(state, self)
        self._submitter = Submitter(state, self, self._completions)
        self._canceller = Canceller(state, self._process)
        self._watch = HeadWatch(state)

    @property
    def info(self) -> BackendInfo:
        return self._state.info

    @property
    def address(self) -> str | None:
        """The GCS address of the Ray in use (``host:port``), once started."""
        if not ray.is_initialized():
            return None
        try:
            return str(ray.get_runtime_context().gcs_address)
        except Exception:  # Ray Client has no GCS address to give
            return self._state.address

    async def start(self, sink: CompletionSink) -> None:
        life = self._state.life
        if life.closed or not life.started:
            life.begin_start()
        else:
            # A second start (a script attaches, then an engine starts it on
            # its own loop): Ray's connection belongs to the process, so the
            # backend follows the new loop.
            life.loop = asyncio.get_running_loop()
        self._state.sink = sink
        await self._process.start()
        # ray.init put its C++ failure-signal handler on SIGTERM, which aborts
        # the driver instead of letting the engine shut down.
        _signals.restore_handlers()
        self._watch.watch(owned=self._process.owns)
        self._chunks.start(sink)

    def submit(self, specs: Sequence[TaskSpec]) -> list[str]:
        rest, refused = self._chunks.route(specs)
        if rest:
            refused += self._submitter.submit(rest)
        return refused

    def cancel(self, uids: Sequence[str]) -> None:
        self._canceller.cancel(self._chunks.cancel(uids))

    async def shutdown(self) -> None:
        state = self._state
        if not state.life.begin_shutdown():
            return
        self._watch.unwatch()
        leftover = list(state.tasks)
        if leftover:
            self.cancel(leftover)
        self._chunks.close()
        # Awaited, not cancelled: a command kill's second sweep must still run.
        for job in list(state.life.background):
            with contextlib.suppress(BaseException):
                await job
        await self._completions.close()
        try:
            await self._process.stop()
        finally:
            self._submitter.clear()
