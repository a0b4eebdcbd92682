"""Dask's scheduler already does what asyncflow needs from a cluster: placement,
data locality and worker resources.  So this adapter adds as little as it can and
keeps everything on the engine's event loop: an asynchronous ``Client`` submits
each loop turn's ready tasks as one ``client.map`` per kind of task (one
``update-graph`` message), and each completion is a coroutine waking on the Dask
future's own event: no thread and no polling.

Why results travel two ways: a Dask completion says only "done"; the value stays
on the worker, and fetching it is a scheduler round trip that costs as much CPU
as running a no-op task.  Fetching every small result that way halves a
fan-out's throughput.  So the worker-side wrapper publishes a *small* result
(pickled, at most ``PUSH_BYTES``) as a Dask event on the client's own topic; it
reaches the client on the same stream just before the completion, and the task
is reported with its plain value.  A bigger result is reported as a
:class:`DaskRemoteValue` wrapping the Dask future: a downstream task on this
backend gets that future as its argument, so the data moves worker to worker and
never through the driver, and it reaches the driver only when someone awaits it
(the fetches of one loop turn share one ``client.gather``).

Ownership: ``DaskExecutionBackend()`` starts a loopback ``LocalCluster`` (its
keyword arguments override the defaults) and closes it at shutdown.  Given an
address, a ``Client`` or a cluster object (``LocalCluster``, a dask-jobqueue
cluster, ...), it opens a client of its own to that scheduler and closes only
that client: the cluster and the caller's client stay up.

Resources map onto Dask worker resources: ``cores`` onto ``CPU`` when the
workers advertise it (the owned cluster does), else onto the worker's thread
count; ``gpus`` onto ``GPU``; ``memory`` (MB) onto ``MEMORY`` (bytes) when
advertised, else onto the worker's memory limit.  A request that no connected
worker could ever meet fails at once with ResourceUnavailableError instead of
waiting in the scheduler forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pickle
import uuid
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import replace
from typing import Any

import dask
import distributed
from dask.sizeof import sizeof
from distributed import Client, Future, LocalCluster, get_worker
from distributed.scheduler import KilledWorker

from ..errors import (
    BackendStartError,
    EngineClosedError,
    ResourceUnavailableError,
    SerializationError,
    TaskDefinitionError,
    UpstreamGone,
    WorkerLostError,
)
from ..protocol import (
    BackendInfo,
    Capabilities,
    Capability,
    CompletionSink,
    RemoteValue,
    UpstreamRef,
)
from ..spec import Command, Resources, TaskSpec
from ..worker import call_pickled, dumps_function, kill_command, run_command

__all__ = ["DaskExecutionBackend", "DaskRemoteValue"]

log = logging.getLogger("asyncflow.dask")

C = Capability
MB = 2**20

DEFAULT_CLUSTER: dict[str, Any] = {
    "n_workers": 2,
    "threads_per_worker": 1,
    "processes": True,
    "host": "127.0.0.1",
    "dashboard_address": None,
}
# Results up to this size (pickled) come back with the completion.
PUSH_BYTES = 4096
# A task whose arguments add up to more than SCATTER_BYTES has each argument over
# SCATTER_EACH scattered to a worker first, instead of riding in the task graph
# (Dask warns about graphs over 10 MB, and routes them through the scheduler).
# One update-graph message is kept under BATCH_BYTES.
SCATTER_BYTES = 1 * MB
SCATTER_EACH = 64 * 1024
BATCH_BYTES = 4 * MB
CONNECT_TIMEOUT = 30.0
CLOSE_TIMEOUT = 30.0
# Fetches in flight at once; requests arriving meanwhile form the next batch.
MAX_GATHERS = 2
# How long a worker keeps looking for a cancelled command that has not started.
KILL_WATCH = 5.0
# ``options=`` keys passed through to ``client.map``.
SUBMIT_OPTIONS = ("workers", "allow_other_workers", "priority")
_EVENT = "asyncflow-result"


DEFAULT_CAPABILITIES = Capabilities.of(
    C.FUNCTIONS,
    C.EXECUTABLES,
    C.KILL_EXECUTABLES,
    C.RESOURCES,
    C.SERIALIZES,
    C.LARGE_PAYLOADS,
    C.PARALLEL,
    C.PIPELINE,
    cancel_running="Dask cannot interrupt a running Python function: its worker "
    "thread runs on and the result is discarded (executables are killed)",
    gpus="no Dask worker advertises a 'GPU' resource; start workers with "
    "--resources GPU=<n>",
)


class DaskRemoteValue(RemoteValue):
    """A task result kept on the Dask workers; ``handle`` is the Dask future."""

    __slots__ = ()

    async def fetch(self) -> Any:
        owner: DaskExecutionBackend = self.owner
        return await owner._fetch(self.handle)


class _Worker:
    __slots__ = ("memory_limit", "nthreads", "resources")

    def __init__(self, info: dict[str, Any]):
        self.nthreads: int = info.get("nthreads") or 1
        self.memory_limit: int = info.get("memory_limit") or 0  # 0: no limit
        self.resources: dict[str, float] = dict(info.get("resources") or {})


class _Tracked:
    __slots__ = ("future", "is_command", "key", "watcher")

    def __init__(
        self, future: Future, key: str, is_command: bool, watcher: asyncio.Task[None]
    ):
        self.future = future
        self.key = key
        self.is_command = is_command
        self.watcher = watcher


_Item = tuple[TaskSpec, tuple[Any, ...]]  # a spec and its worker-call arguments


class DaskExecutionBackend:
    """Runs tasks on a Dask distributed cluster.

    ``address`` is ``None`` (start and own a loopback LocalCluster configured by
    ``**options``, e.g. ``n_workers=4``), a scheduler address such as
    ``"tcp://127.0.0.1:8786"``, a ``distributed.Client`` or a cluster object with
    a ``scheduler_address`` (LocalCluster, dask-jobqueue's SLURMCluster, ...).
    When attaching, ``**options`` go to the ``Client`` this backend opens.
    Function tasks may pass ``options={"workers": [...], "priority": n,
    "allow_other_workers": bool}`` through to Dask.
    """

    #: for listings that must not start a runtime (``asyncflow backends``)
    CAPABILITIES = DEFAULT_CAPABILITIES

    def __init__(self, address: str | Client | Any | None = None, **options: Any):
        self._owns_cluster = address is None
        self._cluster_options = (
            {**DEFAULT_CLUSTER, **options} if address is None else {}
        )
        self._client_options = options if address is not None else {}
        self._user_options = options
        self._target = address
        if address is not None:
            self._address_of(address)  # fail now on a wrong type
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
        if self._workers:
            threads = sum(w.nthreads for w in self._workers)
            gpus = any(w.resources.get("GPU", 0) > 0 for w in self._workers)
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
            if self._owns_cluster:
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
        if "resources" not in opts:
            opts["resources"] = {"CPU": opts.get("threads_per_worker") or 1}
        # The engine owns retries: a task whose worker dies fails at once with
        # WorkerLostError instead of being re-run (and killing) three more times.
        with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
            self._cluster = LocalCluster(asynchronous=True, **opts)
        await self._cluster
        self._client = await Client(
            self._cluster, asynchronous=True, set_as_default=False
        )

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
            "'tcp://127.0.0.1:8786', a distributed.Client or a cluster object, got "
            f"{target!r}"
        )

    async def _refresh_workers(self) -> None:
        client = self._client
        assert client is not None
        ident = await client.scheduler.identity(n_workers=-1)
        self._workers = [_Worker(w) for w in ident.get("workers", {}).values()]
        self._info = self._make_info()

    # -- protocol: submit ----------------------------------------------------------
    def submit(self, specs: Sequence[TaskSpec]) -> None:
        sink = self._sink
        assert sink is not None
        if self._closed or self._client is None:
            for spec in specs:
                sink.set_exception(
                    spec.uid,
                    EngineClosedError(
                        f"task {spec.name!r}: the Dask backend is shut down"
                    ),
                )
            return
        groups: dict[tuple[Any, ...], tuple[Any, list[_Item]]] = {}
        recheck: list[TaskSpec] = []
        scatter: list[TaskSpec] = []
        piped: list[tuple[TaskSpec, dict[str, float] | None]] = []
        for spec in specs:
            if spec.has_remote_args:
                _refs(spec.args, self._consumed)
                _refs(spec.kwargs, self._consumed)
        for spec in specs:
            resources = None
            if not spec.resources.is_default:
                try:
                    resources = self._dask_resources(spec)
                except _Unknown:
                    recheck.append(spec)
                    continue
                except ResourceUnavailableError as exc:
                    sink.set_exception(spec.uid, exc)
                    continue
            if (
                spec.command is None
                and (spec.args or spec.kwargs)
                and _payload(spec.args, spec.kwargs) > SCATTER_BYTES
            ):
                scatter.append(spec)
                continue
            if spec.has_remote_args:
                piped.append((spec, resources))
                continue
            self._add(groups, spec, resources)
        self._map_groups(groups)
        if piped:
            self._submit_piped(piped)
        self._consumed.clear()
        if recheck:
            self._deferred.update(spec.uid for spec in recheck)
            self._spawn(self._recheck(recheck))
        if scatter:
            self._deferred.update(spec.uid for spec in scatter)
            self._spawn(self._submit_scattered(scatter))

    def _submit_piped(
        self, items: list[tuple[TaskSpec, dict[str, float] | None]]
    ) -> None:
        """Specs naming other tasks' results, in the engine's (topological)
        order.  Independent ones still share a ``client.map``; one naming a
        task of the group being built flushes that group first, so the Dask
        future it needs exists."""
        groups: dict[tuple[Any, ...], tuple[Any, list[_Item]]] = {}
        queued: set[str] = set()
        for spec, resources in items:
            try:
                native = (_swap(spec.args, self), _swap(spec.kwargs, self))
            except UpstreamGone as exc:
                if exc.uid not in queued:
                    self._sink.set_exception(spec.uid, exc)  # type: ignore[union-attr]
                    continue
                self._map_groups(groups)
                groups = {}
                queued.clear()
                try:
                    native = (_swap(spec.args, self), _swap(spec.kwargs, self))
                except UpstreamGone as exc:  # the upstream was rejected
                    self._sink.set_exception(spec.uid, exc)  # type: ignore[union-attr]
                    continue
            self._add(groups, spec, resources, native)
            queued.add(spec.uid)
        self._map_groups(groups)

    def _add(
        self,
        groups: dict[tuple[Any, ...], tuple[Any, list[_Item]]],
        spec: TaskSpec,
        resources: dict[str, float] | None,
        native: tuple[tuple[Any, ...], dict[str, Any]] | None = None,
    ) -> None:
        """File ``spec`` with the others that can share one ``client.map``."""
        key = f"{spec.name}-{self._token}-{spec.uid}"
        # A result consumed by a task in the same batch stays on the workers:
        # pushing it to the driver too costs a scheduler message per hop.
        topic = None if spec.uid in self._consumed else self._topic
        if spec.command is not None:
            fn: Callable[..., Any] = _run_command
            args: tuple[Any, ...] = (topic, key, spec.command, spec.uid, spec.name)
        else:
            try:
                blob = self._pickle(spec)
            except SerializationError as exc:
                self._sink.set_exception(spec.uid, exc)  # type: ignore[union-attr]
                return
            a, kw = native or (spec.args, spec.kwargs)
            if spec.has_remote_args and native is None:
                try:
                    a, kw = _swap(a, self), _swap(kw, self)
                except UpstreamGone as exc:
                    self._sink.set_exception(spec.uid, exc)  # type: ignore[union-attr]
                    return
            fn = _run_function
            args = (topic, key, blob, a, kw, spec.is_async, spec.name)
        options = spec.options
        opts = (
            tuple((k, repr(options[k])) for k in SUBMIT_OPTIONS if k in options)
            if options
            else ()
        )
        gkey = (fn, tuple(sorted(resources.items())) if resources else None, opts)
        group = groups.get(gkey)
        if group is None:
            groups[gkey] = (resources, [(spec, args)])
        else:
            group[1].append((spec, args))

    def _map_groups(
        self, groups: dict[tuple[Any, ...], tuple[Any, list[_Item]]]
    ) -> None:
        for (fn, _, _), (resources, items) in groups.items():
            options = {
                k: v for k, v in items[0][0].options.items() if k in SUBMIT_OPTIONS
            }
            # Keep each update-graph message small enough for Dask not to warn.
            chunk: list[_Item] = []
            size = 0
            for item in items:
                spec = item[0]
                n = 0 if spec.command is not None else _payload(spec.args, spec.kwargs)
                if chunk and size + n > BATCH_BYTES:
                    self._map(fn, resources, options, chunk)
                    chunk, size = [], 0
                chunk.append(item)
                size += n
            if chunk:
                self._map(fn, resources, options, chunk)

    def _map(
        self,
        fn: Callable[..., Any],
        resources: dict[str, float] | None,
        options: dict[str, Any],
        chunk: list[_Item],
    ) -> None:
        client = self._client
        assert client is not None and self._loop is not None
        keys = [args[1] for _, args in chunk]
        columns = list(zip(*(args for _, args in chunk), strict=True))
        try:
            futures = client.map(
                fn,
                *columns,
                key=keys,
                pure=False,
                resources=resources,
                **options,
            )
        except Exception as exc:
            if len(chunk) > 1:  # find the culprit: one at a time
                for item in chunk:
                    self._map(fn, resources, options, [item])
            else:
                self._reject(chunk[0][0], exc)
            return
        create_task = self._loop.create_task
        for (spec, _), fut, key in zip(chunk, futures, keys, strict=True):
            watcher = create_task(self._watch(spec.uid, spec.name, fut))
            self._tasks[spec.uid] = _Tracked(
                fut, key, spec.command is not None, watcher
            )
            self._keys.add(key)

    def _reject(self, spec: TaskSpec, exc: Exception) -> None:
        sink = self._sink
        assert sink is not None
        err: BaseException = exc
        if _is_pickling_error(exc):
            err = SerializationError(
                f"task {spec.name!r}: an argument cannot be serialised for Dask "
                f"({type(exc).__name__}: {exc}); pass plain data, or define its "
                "types at module level"
            )
            err.__cause__ = exc
        sink.set_exception(spec.uid, err)

    def _pickle(self, spec: TaskSpec) -> bytes:
        fn = spec.function
        try:
            return self._pickled[fn]
        except KeyError:
            pass
        except TypeError:  # unhashable callable object
            return _dumps(spec)
        blob = self._pickled[fn] = _dumps(spec)
        return blob

    # -- completions ---------------------------------------------------------------
    def _on_event(self, event: tuple[float, Any]) -> None:
        """A small result published by a worker (see ``_push``); it arrives just
        before the task's completion, on the same stream."""
        msg = event[1]
        if type(msg) in (list, tuple) and len(msg) == 3 and msg[0] == _EVENT:
            key, blob = msg[1], msg[2]
            if isinstance(blob, bytes) and key in self._keys:
                self._pushed[key] = blob

    async def _watch(self, uid: str, name: str, fut: Future) -> None:
        exc = await fut.exception()
        tracked = self._tasks.pop(uid, None)
        if tracked is None:
            return  # cancelled meanwhile
        self._keys.discard(tracked.key)
        blob = self._pushed.pop(tracked.key, None)
        sink = self._sink
        assert sink is not None
        if exc is None and fut.status == "finished":
            if blob is not None:
                try:
                    value = pickle.loads(blob)
                except Exception:  # e.g. a class the driver cannot import
                    pass
                else:
                    sink.set_result(uid, value)
                    return
            sink.set_result(uid, DaskRemoteValue(self, fut))
            return
        sink.set_exception(uid, self._translate(exc, name, fut))

    @staticmethod
    def _translate(exc: BaseException | None, name: str, fut: Future) -> BaseException:
        if isinstance(exc, KilledWorker):
            return WorkerLostError(
                f"task {name!r}: the Dask worker running it died ({exc})"
            )
        if exc is None or fut.cancelled() or isinstance(exc, asyncio.CancelledError):
            reason = getattr(exc, "reason", None) or getattr(
                getattr(fut, "_state", None), "exception", None
            )
            return WorkerLostError(
                f"task {name!r}: Dask dropped it ({reason or 'cancelled'}); was the "
                "scheduler restarted or the connection to it lost?"
            )
        return exc

    # -- resources -----------------------------------------------------------------
    def _dask_resources(
        self, spec: TaskSpec, final: bool = False
    ) -> dict[str, float] | None:
        """Dask resources for ``spec``; raises if no worker could ever run it.

        Raises ``_Unknown`` when the cached worker list says no but a fresh one
        might say yes (``final`` is False), so the caller refreshes first.
        """
        res = spec.resources
        if res.ranks > 1:
            raise ResourceUnavailableError(
                f"task {spec.name!r} asks for {res.ranks} MPI ranks, but the Dask "
                "backend has no MPI launcher; use a backend with MPI support"
            )
        workers = self._workers
        want: dict[str, float] = {}
        if any("CPU" in w.resources for w in workers):
            want["CPU"] = res.cores
        if res.gpus:
            want["GPU"] = res.gpus
        if res.memory and any("MEMORY" in w.resources for w in workers):
            want["MEMORY"] = res.memory * MB
        if not workers:
            return want or None  # nobody to ask yet (an adaptive cluster scaling up)
        for w in workers:
            if (
                all(w.resources.get(k, 0) >= v for k, v in want.items())
                and ("CPU" in want or w.nthreads >= res.cores)
                and (
                    "MEMORY" in want
                    or not res.memory
                    or not w.memory_limit
                    or w.memory_limit >= res.memory * MB
                )
            ):
                return want or None
        if not final:
            raise _Unknown
        best = max(workers, key=lambda w: (w.nthreads, w.memory_limit))
        limit = (
            f"{best.memory_limit // MB} MB memory limit"
            if best.memory_limit
            else "no memory limit"
        )
        raise ResourceUnavailableError(
            f"task {spec.name!r} asks for {_describe(res)}, but no Dask worker can "
            f"ever provide it ({len(workers)} worker(s); the largest has "
            f"{best.nthreads} thread(s), {limit}, resources "
            f"{best.resources or '{}'}); lower the request, or start workers with "
            'more --nthreads / --resources (e.g. "CPU=4 GPU=1")'
        )

    async def _recheck(self, specs: list[TaskSpec]) -> None:
        """Refresh the worker list once, then submit or reject ``specs``."""
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.ensure_future(self._refresh_workers())
        with contextlib.suppress(Exception):
            await asyncio.shield(self._refreshing)
        sink = self._sink
        assert sink is not None
        groups: dict[tuple[Any, ...], tuple[Any, list[_Item]]] = {}
        for spec in specs:
            if spec.uid not in self._deferred or self._closed:
                continue  # cancelled meanwhile
            self._deferred.discard(spec.uid)
            try:
                resources = self._dask_resources(spec, final=True)
            except ResourceUnavailableError as exc:
                sink.set_exception(spec.uid, exc)
                continue
            if (
                spec.command is None
                and _payload(spec.args, spec.kwargs) > SCATTER_BYTES
            ):
                self._deferred.add(spec.uid)
                self._spawn(self._submit_scattered([spec]))
                continue
            self._add(groups, spec, resources)
        self._map_groups(groups)

    # -- large arguments -----------------------------------------------------------
    async def _submit_scattered(self, specs: list[TaskSpec]) -> None:
        """Send big arguments straight to the workers, then submit the tasks."""
        client = self._client
        assert client is not None
        for spec in specs:
            if spec.uid not in self._deferred:
                continue
            try:
                moved = await self._scatter_args(client, spec)
            except Exception as exc:
                if spec.uid in self._deferred:
                    self._deferred.discard(spec.uid)
                    self._reject(spec, exc)
                continue
            if spec.uid not in self._deferred or self._closed:
                continue  # cancelled meanwhile
            self._deferred.discard(spec.uid)
            resources = (
                None
                if spec.resources.is_default
                else self._dask_resources(spec, final=True)
            )
            groups: dict[tuple[Any, ...], tuple[Any, list[_Item]]] = {}
            self._add(groups, moved, resources)
            self._map_groups(groups)

    async def _scatter_args(self, client: Client, spec: TaskSpec) -> TaskSpec:
        big: list[Any] = []
        slots: list[tuple[bool, Any]] = []
        for i, a in enumerate(spec.args):
            if not _has_remote(a) and _size(a) > SCATTER_EACH:
                slots.append((True, i))
                big.append(a)
        for k, v in spec.kwargs.items():
            if not _has_remote(v) and _size(v) > SCATTER_EACH:
                slots.append((False, k))
                big.append(v)
        futures = await client.scatter(big, hash=False) if big else []
        args = list(spec.args)
        kwargs = dict(spec.kwargs)
        for (positional, at), fut in zip(slots, futures, strict=True):
            if positional:
                args[at] = DaskRemoteValue(self, fut)
            else:
                kwargs[at] = DaskRemoteValue(self, fut)
        return replace(spec, args=tuple(args), kwargs=kwargs, has_remote_args=True)

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
            self._spawn(self._stop(batch))

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

    # -- remote values -------------------------------------------------------------
    def _fetch(self, fut: Future) -> asyncio.Future[Any]:
        if self._closed or self._loop is None:
            raise EngineClosedError(
                f"the value of Dask task {fut.key!r} stayed on the cluster, and the "
                "backend was shut down before anyone awaited it; await results "
                "before the engine shuts down"
            )
        waiter = self._loop.create_future()
        self._fetch_queue.append((fut, waiter))
        if not self._fetch_scheduled and self._gathering < MAX_GATHERS:
            self._fetch_scheduled = True
            self._loop.call_soon(self._flush_fetches)
        return waiter

    def _flush_fetches(self) -> None:
        self._fetch_scheduled = False
        if not self._fetch_queue or self._closed or self._gathering >= MAX_GATHERS:
            return
        batch, self._fetch_queue = self._fetch_queue, []
        self._gathering += 1
        self._spawn(self._gather(batch))

    async def _gather(self, batch: list[tuple[Future, asyncio.Future[Any]]]) -> None:
        """One ``client.gather`` for everything asked for in one loop turn (or
        while the previous gathers ran)."""
        try:
            values = await self._gather_values([f for f, _ in batch])
        except BaseException as exc:  # cancelled at shutdown
            for _, waiter in batch:
                if not waiter.done():
                    waiter.set_exception(
                        EngineClosedError(
                            f"the Dask backend shut down while fetching ({exc!r})"
                        )
                    )
            raise
        finally:
            self._gathering -= 1
            if self._fetch_queue and not self._fetch_scheduled and not self._closed:
                self._fetch_scheduled = True
                assert self._loop is not None
                self._loop.call_soon(self._flush_fetches)
        for (fut, waiter), value in zip(batch, values, strict=True):
            if waiter.done():
                continue
            if isinstance(value, _Failure):
                waiter.set_exception(self._fetch_error(value.exc, fut))
            else:
                waiter.set_result(value)

    async def _gather_values(self, futures: list[Future]) -> list[Any]:
        client = self._client
        assert client is not None
        try:
            return list(await client.gather(futures))
        except Exception as exc:
            if len(futures) == 1:
                return [_Failure(exc)]
            # Which one failed?  Ask each; the others are in memory.
            return list(
                await asyncio.gather(*(_capture(client.gather(f)) for f in futures))
            )

    @staticmethod
    def _fetch_error(exc: BaseException, fut: Future) -> BaseException:
        if isinstance(exc, KilledWorker | asyncio.CancelledError):
            return WorkerLostError(
                f"the value of Dask task {fut.key!r} was lost with its worker ({exc})"
            )
        if _is_pickling_error(exc):
            err = SerializationError(
                f"the result of Dask task {fut.key!r} cannot be serialised "
                f"({type(exc).__name__}: {exc}); return plain data"
            )
            err.__cause__ = exc
            return err
        return exc

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
        if cluster is not None:
            await cluster.close(timeout=CLOSE_TIMEOUT)

    # -- helpers -------------------------------------------------------------------
    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        assert self._loop is not None
        task = self._loop.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background_done)

    def _background_done(self, task: asyncio.Task[Any]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("dask adapter: background job failed", exc_info=task.exception())


class _Unknown(Exception):
    """The cached worker list cannot meet a request; refresh and ask again."""


class _Failure:
    __slots__ = ("exc",)

    def __init__(self, exc: BaseException):
        self.exc = exc


async def _capture(aw: Any) -> Any:
    try:
        return await aw
    except Exception as exc:
        return _Failure(exc)


_CONTAINERS = (list, tuple, dict, set, frozenset)
_SMALL = (int, float, bool, type(None), complex)


def _swap(obj: Any, owner: DaskExecutionBackend) -> Any:
    """``obj`` with this backend's remote values replaced by their Dask futures
    (Dask finds futures nested in lists, tuples, sets and dicts)."""
    t = type(obj)
    if t is DaskRemoteValue:
        return obj.handle if obj.owner is owner else obj
    if t is UpstreamRef:
        tracked = owner._tasks.get(obj.uid)
        if tracked is None:
            raise UpstreamGone(obj.uid)
        return tracked.future
    if t is tuple or t is list or t is set:
        return t(_swap(v, owner) for v in obj)
    if t is dict:
        return {k: _swap(v, owner) for k, v in obj.items()}
    return obj


def _refs(obj: Any, out: set[str]) -> None:
    t = type(obj)
    if t is UpstreamRef:
        out.add(obj.uid)
    elif t is dict:
        for v in obj.values():
            _refs(v, out)
    elif t in _CONTAINERS:
        for v in obj:
            _refs(v, out)


def _has_remote(obj: Any) -> bool:
    t = type(obj)
    if t is DaskRemoteValue or t is UpstreamRef:
        return True
    if t is dict:
        return any(_has_remote(v) for v in obj.values())
    if t in _CONTAINERS:
        return any(_has_remote(v) for v in obj)
    return False


def _payload(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    n = 0
    for a in args:
        n += _size(a)
    if kwargs:
        for v in kwargs.values():
            n += _size(v)
    return n


def _size(obj: Any) -> int:
    t = type(obj)
    if t in _SMALL:
        return 32
    if t is str or t is bytes:
        return len(obj)
    if t is DaskRemoteValue or t is UpstreamRef:
        return 64
    return int(sizeof(obj))


def _dumps(spec: TaskSpec) -> bytes:
    try:
        assert spec.function is not None
        return dumps_function(spec.function)
    except Exception as exc:
        raise SerializationError(
            f"task {spec.name!r}: its function cannot be serialised for Dask "
            f"({type(exc).__name__}: {exc}); define it at module level and do not "
            "capture locks, sockets or open files"
        ) from exc


def _is_pickling_error(exc: BaseException) -> bool:
    if isinstance(exc, pickle.PicklingError):
        return True
    text = f"{type(exc).__name__} {exc}".lower()
    return isinstance(exc, TypeError | AttributeError | ValueError) and (
        "pickle" in text or "serializ" in text
    )


def _describe(res: Resources) -> str:
    parts = [f"cores={res.cores}"]
    if res.gpus:
        parts.append(f"gpus={res.gpus}")
    if res.memory:
        parts.append(f"memory={res.memory} MB")
    return ", ".join(parts)


def _start_error(exc: Exception, target: Any, owned: bool) -> Exception:
    if isinstance(exc, BackendStartError | EngineClosedError):
        return exc
    if owned:
        hint = ""
        if "Nanny failed to start" in str(exc) or "bootstrapping phase" in str(exc):
            hint = (
                " (a script that starts a process cluster needs the "
                "`if __name__ == '__main__':` guard)"
            )
        return BackendStartError(
            f"could not start a Dask LocalCluster: {type(exc).__name__}: {exc}{hint}"
        )
    where = target if isinstance(target, str) else repr(target)
    return BackendStartError(
        f"could not connect to the Dask scheduler at {where}: "
        f"{type(exc).__name__}: {exc}; is `dask scheduler` running there?"
    )


# -- worker side ---------------------------------------------------------------------
def _run_function(
    topic: str | None,
    key: str,
    blob: bytes,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    is_async: bool,
    name: str,
) -> Any:
    try:
        value = call_pickled(blob, args, kwargs, is_async, name)
    except BaseException as exc:
        if _deep(exc.__traceback__):
            # Dask's client cannot rebuild a traceback this deep (a RecursionError
            # would never be reported); the formatted one is in the notes anyway.
            raise exc.with_traceback(None) from exc.__cause__
        raise
    _push(topic, key, value)
    return value


def _deep(tb: Any, limit: int = 200) -> bool:
    while tb is not None and limit:
        tb, limit = tb.tb_next, limit - 1
    return tb is not None


def _run_command(
    topic: str | None, key: str, command: Command, uid: str, name: str
) -> str:
    value = run_command(command, uid, name)
    _push(topic, key, value)
    return value


def _push(topic: str | None, key: str, value: Any) -> None:
    """Publish a small result to the client; it stays on the worker as well."""
    if topic is None:
        return
    try:
        if type(value) not in _SMALL and _size(value) > PUSH_BYTES:
            return
        blob = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
        if len(blob) <= PUSH_BYTES:
            get_worker().log_event(topic, [_EVENT, key, blob])
    except Exception:  # unpicklable here: the client fetches it the usual way
        pass


async def _kill_on_worker(tasks: list[tuple[str, str]], dask_worker: Any = None) -> int:
    """Runs in every worker (``client.run``): kill the commands running here.

    A command this worker still holds (its thread may be about to start it) is
    looked for again until it starts or the worker lets go of it.
    """
    known = dask_worker.state.tasks
    loop = asyncio.get_running_loop()
    deadline = loop.time() + KILL_WATCH
    killed = 0
    while True:
        waiting = []
        for uid, key in tasks:
            if kill_command(uid):
                killed += 1
            elif key in known:
                waiting.append((uid, key))
        if not waiting or loop.time() > deadline:
            return killed
        tasks = waiting
        await asyncio.sleep(0.02)
