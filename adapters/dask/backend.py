"""DaskExecutionBackend: the protocol, delegated to the adapter's parts.

The backend owns one :class:`~.state.DaskState` and the collaborators that
share it: the :class:`~.runtime.Runtime` (cluster and client), the
:class:`~.submit.Submitter`, the :class:`~.results.Completions`, the
:class:`~.cancel.Canceller` and, for the page's HPC dict, the
:class:`~.allocation.SlurmAllocation`.  What is left here is the order in which
they start and stop, which is what the protocol's lifecycle promises hang on.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping, Sequence
from typing import Any

from distributed import Client

from ...errors import BackendStartError
from ...protocol import BackendInfo, CompletionSink
from ...spec import TaskSpec
from .._awaitable import AwaitableBackend
from ..toolkit import Lifecycle
from .allocation import SlurmAllocation
from .cancel import Canceller
from .chunks import DaskChunks
from .config import DEFAULT_CAPABILITIES, Settings
from .errors import start_error
from .resources import ResourceChecker
from .results import Completions
from .runtime import Runtime
from .state import DaskState, log
from .submit import Submitter

__all__ = ["DaskExecutionBackend"]


class DaskExecutionBackend(AwaitableBackend):
    """Runs tasks on a Dask distributed cluster.

    ``address`` is ``None`` (start and own a loopback LocalCluster configured by
    ``**options``, e.g. ``n_workers=4``), the reference page's HPC dict
    (``{'resource': 'slurm', 'queue': ..., 'nodes': ..., 'walltime': ...}``:
    own a dask-jobqueue SLURMCluster of one job per node, see ``slurm``; its
    ``**options`` override the SLURMCluster arguments), a scheduler address such as
    ``"tcp://127.0.0.1:8786"``, a ``distributed.Client`` or a cluster object with
    a ``scheduler_address`` (LocalCluster, dask-jobqueue's SLURMCluster, ...).
    When attaching, ``**options`` go to the ``Client`` this backend opens.
    Function tasks may pass ``options={"workers": [...], "priority": n,
    "allow_other_workers": bool}`` through to Dask.

    Many calls of one function in one batch travel several to a Dask task (see
    :mod:`.chunks`): their results come back to the driver instead of staying
    on the workers.  ``chunking=False`` sends every task as a Dask task of its
    own, for a workflow that watches each task on Dask's dashboard or in its
    task stream, or whose short tasks return large values that other tasks on
    this backend read (Dask's path passes those worker to worker).
    """

    #: for listings that must not start a runtime (``asyncflow backends``)
    CAPABILITIES = DEFAULT_CAPABILITIES

    def __init__(
        self,
        address: str | Client | Mapping[str, Any] | Any | None = None,
        *,
        chunking: bool = True,
        **options: Any,
    ):
        settings = Settings.from_args(address, options)
        state = self._state = DaskState(
            settings=settings,
            owner=self,
            life=Lifecycle(type(self).__name__, log),
            info=settings.describe([]),
        )
        self._canceller = Canceller(state)
        plan = settings.plan
        allocation = (
            None
            if plan is None
            else SlurmAllocation(state, plan, self._canceller.cancel)
        )
        self._completions = Completions(
            state, None if allocation is None else allocation.why_lost
        )
        self._resources = ResourceChecker(state)
        self._submitter = Submitter(state, self._resources, self._completions)
        self._runtime = Runtime(state, allocation)
        self._chunks = DaskChunks(
            state,
            self._completions,
            self._submitter.functions,
            None if allocation is None else allocation.why_lost,
            chunking,
        )

    @property
    def info(self) -> BackendInfo:
        return self._state.info

    @property
    def client(self) -> Client | None:
        """The asynchronous client on the engine's loop (``None`` until started)."""
        return self._state.client

    async def start(self, sink: CompletionSink) -> None:
        state = self._state
        try:
            state.life.begin_start()
        except BackendStartError as exc:
            raise BackendStartError(
                f"{exc} (several may attach to one scheduler)"
            ) from None
        state.sink = sink
        try:
            await self._runtime.open(self._completions.on_event)
            await self._resources.refresh()
            self._chunks.start(sink)
        except BaseException as exc:
            with contextlib.suppress(Exception):
                await self._runtime.close()
            if isinstance(exc, Exception):
                settings = state.settings
                raise start_error(exc, settings.target, settings.owns_cluster) from exc
            raise

    def submit(self, specs: Sequence[TaskSpec]) -> list[str]:
        rest, refused = self._chunks.route(specs)
        if rest:
            refused += self._submitter.submit(rest)
        return refused

    def cancel(self, uids: Sequence[str]) -> None:
        self._canceller.cancel(self._chunks.cancel(uids))

    async def shutdown(self) -> None:
        """Tasks are stopped while the client is still up (their commands must
        be killed on the workers), fetches failed before the client closes (so
        that no await hangs on it), the cluster closed last."""
        state = self._state
        if not state.life.begin_shutdown():
            return
        await self._chunks.close()
        watchers = await self._canceller.stop_all()
        await state.life.cancel_background()
        await asyncio.gather(*watchers, return_exceptions=True)
        await self._completions.close()
        state.keys.clear()
        state.deferred.clear()
        await self._runtime.close()
        self._submitter.functions.clear()
