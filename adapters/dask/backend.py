"""DaskExecutionBackend itself: its construction, start, cancel and shutdown.

The protocol's lifecycle lives here: owning a LocalCluster (or, from the page's
HPC dict, a SLURMCluster: see ``allocation``) or attaching a client of our own to
someone else's scheduler, subscribing to the topic workers push
small results to, and tearing all of that down (cancelling what still runs,
killing running commands).  Submission and results are the mixins it is built
from (``submit``, ``resources``, ``results``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import dask
import distributed
from distributed import Client, Future, LocalCluster

from ...errors import BackendStartError, EngineClosedError, TaskDefinitionError
from ...hpc import is_allocation
from ...protocol import BackendInfo, Capabilities, Capability, CompletionSink
from ...worker import COMMAND_PIDS_ENV, kill_listed, pid_dir_under
from .._awaitable import AwaitableBackend
from .allocation import _AllocationMixin
from .base import _Tracked, _Worker, log
from .errors import _start_error
from .resources import _ResourcesMixin
from .results import _ResultsMixin
from .slurm import SlurmPlan
from .submit import _SubmitMixin
from .worker import CommandReaper, _kill_on_worker

C = Capability

DEFAULT_CLUSTER: dict[str, Any] = {
    "n_workers": 2,
    "threads_per_worker": 1,
    "processes": True,
    "host": "127.0.0.1",
    "dashboard_address": None,
}
CONNECT_TIMEOUT = 30.0
CLOSE_TIMEOUT = 30.0


DEFAULT_CAPABILITIES = Capabilities.of(
    C.FUNCTIONS,
    C.EXECUTABLES,
    C.KILL_EXECUTABLES,
    C.RESOURCES,
    C.SERIALIZES,
    C.LARGE_PAYLOADS,
    C.PARALLEL,
    C.PIPELINE,
    reports_running="Dask tells its scheduler, not the client, when a task starts",
    cancel_queued="Dask cancels through its scheduler, asynchronously: a worker "
    "that frees up before the cancel reaches it may still start a queued task",
    cancel_running="Dask cannot interrupt a running Python function: its worker "
    "thread runs on and the result is discarded (executables are killed)",
    gpus="no Dask worker advertises a 'GPU' resource; start workers with "
    "--resources GPU=<n>",
)


class DaskExecutionBackend(
    _SubmitMixin, _ResourcesMixin, _ResultsMixin, _AllocationMixin, AwaitableBackend
):
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
    """

    #: for listings that must not start a runtime (``asyncflow backends``)
    CAPABILITIES = DEFAULT_CAPABILITIES

    def __init__(
        self,
        address: str | Client | Mapping[str, Any] | Any | None = None,
        **options: Any,
    ):
        # the dict is checked now: a typo fails here, not in a batch job
        self._plan = (
            SlurmPlan.from_mapping(address)
            if isinstance(address, Mapping) and is_allocation(address)
            else None
        )
        target = None if self._plan is not None else address
        self._owns_cluster = target is None
        self._cluster_options = (
            {**DEFAULT_CLUSTER, **options}
            if address is None
            else dict(options)
            if self._plan is not None
            else {}
        )
        self._client_options = options if target is not None else {}
        self._user_options = options
        self._target = target
        if target is not None:
            self._address_of(target)  # fail now on a wrong type
        self._jobs = None
        self._planned = []
        self._job_ended = None
        self._jobs_gone = set()
        self._dead = None
        self._cluster: Any = None
        self._client: Client | None = None
        self._sink: CompletionSink | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started = False
        self._closed = False
        self._token = uuid.uuid4().hex[:8]
        self._tasks: dict[str, _Tracked] = {}
        self._keys: set[str] = set()  # Dask keys of the tasks being watched
        self._pushed: dict[str, bytes] = {}  # key -> pickled small result
        self._pickled: dict[Any, bytes] = {}
        self._deferred: set[str] = set()  # uids awaiting a refresh or a scatter
        self._consumed: set[str] = set()  # uids a spec of this batch takes in
        self._topic: str | None = None
        self._background: set[asyncio.Task[Any]] = set()
        # cancel()'s _stop() jobs: shutdown waits for them (they kill running
        # commands) instead of cancelling them with the other background jobs.
        self._stops: set[asyncio.Task[Any]] = set()
        self._scratch: str | None = None
        self._cancel_queue: list[tuple[str, _Tracked]] = []
        self._fetch_queue: list[tuple[Future, asyncio.Future[Any]]] = []
        self._fetch_scheduled = False
        self._gathering = 0
        self._workers: list[_Worker] = []
        self._refreshing: asyncio.Future[None] | None = None
        self._processes = self._guess_processes()
        self._info = self._make_info()

    # -- protocol: info ------------------------------------------------------------
    @property
    def info(self) -> BackendInfo:
        return self._info

    @property
    def client(self) -> Client | None:
        """The asynchronous client on the engine's loop (``None`` until started)."""
        return self._client

    def _guess_processes(self) -> bool:
        if self._owns_cluster:
            return bool(self._cluster_options.get("processes", True))
        return not self._address_of(self._target)[0].startswith("inproc://")

    def _make_info(self) -> BackendInfo:
        supported = set(DEFAULT_CAPABILITIES.supported)
        reasons = dict(DEFAULT_CAPABILITIES.reasons)
        workers = self._workers or self._planned
        if workers:
            threads = sum(w.nthreads for w in workers)
            gpus = any(w.resources.get("GPU", 0) > 0 for w in workers)
        elif self._plan is not None:  # refined once Slurm describes the nodes
            alloc = self._plan.alloc
            threads = alloc.nodes * (alloc.cores_per_node or 2)
            gpus = alloc.gpus_per_node > 0
        elif self._owns_cluster:
            o = self._cluster_options
            threads = (o.get("n_workers") or os.cpu_count() or 1) * (
                o.get("threads_per_worker") or 1
            )
            gpus = bool((o.get("resources") or {}).get("GPU"))
        else:
            threads, gpus = 2, False  # refined once connected
        if threads < 2:
            supported.discard(C.PARALLEL)
            reasons[C.PARALLEL] = "the Dask cluster has a single worker thread"
        if gpus:
            supported.add(C.GPUS)
            reasons.pop(C.GPUS, None)
        elif self._plan is not None:
            reasons[C.GPUS] = "the allocation has no GPUs; add 'gpus_per_node'"
        return BackendInfo(
            name="dask" if self._processes else "dask-threads",
            runtime="dask.distributed",
            runtime_version=distributed.__version__,
            capabilities=Capabilities(frozenset(supported), reasons),
        )

    # -- protocol: start -----------------------------------------------------------
    async def start(self, sink: CompletionSink) -> None:
        if self._closed:
            raise EngineClosedError("this DaskExecutionBackend was shut down")
        if self._started:
            raise BackendStartError(
                "this DaskExecutionBackend is already started; give each engine a "
                "backend of its own (several may attach to one scheduler)"
            )
        self._started = True
        self._sink = sink
        self._loop = asyncio.get_running_loop()
        try:
            if self._plan is not None:
                await self._start_allocation()
            elif self._owns_cluster:
                await self._start_cluster()
            else:
                await self._connect()
            client = self._client
            assert client is not None
            # Our own topic: the scheduler drops its events when we disconnect.
            client.subscribe_topic(client.id, self._on_event)
            self._topic = client.id
            await self._refresh_workers()
        except BaseException as exc:
            with contextlib.suppress(Exception):
                await self._close_runtime()
            if isinstance(exc, Exception):
                raise _start_error(exc, self._target, self._owns_cluster) from exc
            raise

    async def _start_cluster(self) -> None:
        opts = dict(self._cluster_options)
        if opts.get("dashboard_address") is None:
            # No dashboard, and its HTTP server (metrics, health) on an ephemeral
            # loopback port: the default 8787 warns when a second cluster starts.
            sched = dict(opts.get("scheduler_kwargs") or {})
            sched.setdefault("dashboard_address", "127.0.0.1:0")
            sched.setdefault("dashboard", False)
            opts["scheduler_kwargs"] = sched
        if not opts.get("processes", True) and "host" not in self._user_options:
            opts.pop("host", None)  # inproc addresses name no interface
            # ...so an in-process worker would start its HTTP server (metrics,
            # health) on every interface: pin it to loopback.
            opts.setdefault("worker_dashboard_address", "127.0.0.1:0")
        if "resources" not in opts:
            opts["resources"] = {"CPU": opts.get("threads_per_worker") or 1}
        # Shutdown removes this directory.  Unless the user chose another, it
        # holds the workers' scratch space (a nanny that SIGKILLs a slow-closing
        # worker leaves its lock files behind), and worker processes list their
        # running commands in it (COMMAND_PIDS_ENV): the CommandReaper cannot
        # kill those of a worker killed that way.
        self._scratch = tempfile.mkdtemp(prefix="asyncflow-dask-")
        opts.setdefault("local_directory", self._scratch)
        if opts.get("processes", True):
            pid_dir = pid_dir_under(self._scratch)
            os.mkdir(pid_dir)
            opts["env"] = {**(opts.get("env") or {}), COMMAND_PIDS_ENV: pid_dir}
        # The engine owns retries: a task whose worker dies fails at once with
        # WorkerLostError instead of being re-run (and killing) three more times.
        # (The scheduler reads its config when it starts, in the await.)
        with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
            self._cluster = LocalCluster(asynchronous=True, **opts)
            await self._cluster
        self._client = await Client(
            self._cluster, asynchronous=True, set_as_default=False
        )
        await self._client.register_plugin(CommandReaper())

    async def _connect(self) -> None:
        address, security = self._address_of(self._target)
        opts = dict(self._client_options)
        if security is not None:
            opts.setdefault("security", security)
        opts.setdefault("timeout", CONNECT_TIMEOUT)
        opts.setdefault("set_as_default", False)
        self._client = await Client(address, asynchronous=True, **opts)

    @staticmethod
    def _address_of(target: Any) -> tuple[str, Any]:
        if isinstance(target, str):
            return target, None
        if isinstance(target, Client):
            return target.scheduler.address, target.security
        address = getattr(target, "scheduler_address", None)
        if isinstance(address, str):
            return address, getattr(target, "security", None)
        raise TaskDefinitionError(
            "DaskExecutionBackend(address) takes a scheduler address such as "
            "'tcp://127.0.0.1:8786', a distributed.Client, a cluster object or an "
            f"HPC dict such as {{'resource': 'slurm', 'nodes': 2}}, got {target!r}"
        )

    # -- protocol: cancel ----------------------------------------------------------
    def cancel(self, uids: Sequence[str]) -> None:
        queue = self._cancel_queue
        for uid in uids:
            tracked = self._tasks.pop(uid, None)
            if tracked is None:
                self._deferred.discard(uid)
                continue
            tracked.watcher.cancel()
            self._keys.discard(tracked.key)
            self._pushed.pop(tracked.key, None)
            if not queue:
                assert self._loop is not None
                self._loop.call_soon(self._flush_cancels)
            queue.append((uid, tracked))

    def _flush_cancels(self) -> None:
        batch, self._cancel_queue = self._cancel_queue, []
        if batch and not self._closed:
            task = self._spawn(self._stop(batch))
            self._stops.add(task)
            task.add_done_callback(self._stops.discard)

    async def _stop(self, batch: list[tuple[str, _Tracked]]) -> None:
        """Cancel ``batch`` in Dask and kill its running commands."""
        client = self._client
        if client is None or client.status != "running":
            return
        jobs: list[Any] = [client.cancel([t.future for _, t in batch], force=True)]
        kills = [(uid, t.key) for uid, t in batch if t.is_command]
        if kills:
            jobs.append(client.run(_kill_on_worker, kills, on_error="return"))
        for r in await asyncio.gather(*jobs, return_exceptions=True):
            if isinstance(r, Exception) and not self._closed:
                log.warning("dask: cancelling %d task(s) failed: %r", len(batch), r)

    # -- protocol: shutdown --------------------------------------------------------
    async def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        tasks, self._tasks = self._tasks, {}
        batch = [*self._cancel_queue, *tasks.items()]
        self._cancel_queue = []
        for _, tracked in batch:
            tracked.watcher.cancel()
        client = self._client
        if client is not None and batch and client.status == "running":
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._stop(batch), CLOSE_TIMEOUT)
        if self._stops:
            await asyncio.wait(list(self._stops), timeout=CLOSE_TIMEOUT)
        background = list(self._background)
        for task in background:
            task.cancel()
        await asyncio.gather(
            *background, *(t.watcher for _, t in batch), return_exceptions=True
        )
        for _, waiter in self._fetch_queue:
            if not waiter.done():
                waiter.set_exception(EngineClosedError("the Dask backend shut down"))
        self._fetch_queue.clear()
        self._pushed.clear()
        self._keys.clear()
        self._deferred.clear()
        await self._close_runtime()
        self._pickled.clear()

    async def _close_runtime(self) -> None:
        client, self._client = self._client, None
        cluster, self._cluster = self._cluster, None
        if client is not None:
            with contextlib.suppress(Exception):
                if client.id in client._event_handlers:
                    # else the scheduler logs a CRITICAL error sending us the
                    # "remove-client" event on the comm we are closing
                    client.unsubscribe_topic(client.id)
                await client.close(timeout=CLOSE_TIMEOUT)
        try:
            if cluster is not None:
                await cluster.close(timeout=CLOSE_TIMEOUT)
        finally:
            # after the cluster's own scancel: wait until Slurm lists no job
            with contextlib.suppress(Exception):
                await self._close_jobs()
            scratch, self._scratch = self._scratch, None
            if scratch is not None:
                # Commands outlive a worker the nanny killed, and a driver
                # stopped by Ctrl-C never reached the workers to kill them.
                kill_listed(pid_dir_under(scratch))
                shutil.rmtree(scratch, ignore_errors=True)
