"""Ray: tasks become Ray tasks, and big results stay in Ray's object store.

Ray already returns a small result inline to the driver and keeps a big one (over
100 KiB) in its shared-memory store.  We follow that split: when a task is ready,
its small value or error is read from the driver's own memory in one ``ray.get``
per batch, and a big value becomes a RayValue, so a 200 MB result never enters
the driver unless someone awaits it.  (Objects between 100 KiB and 1 MiB are read
once anyway, because an error with a long message is stored that way too.)  Its
ObjectRef goes straight into dependent ``.remote()`` calls, where Ray resolves it
on the worker.  Ray resolves only top-level ObjectRef arguments, so refs nested in
lists or dicts travel as extra top-level arguments and are put back in place on
the worker.

Readiness arrives through Ray's ObjectRef callback (the one behind ``await
ref``), registered without fetching the value; callbacks from Ray's thread are
batched onto the event loop.  No thread and no polling per task.  Measured on 2
cores, a per-task fetching callback (``ref.future()``, ``_on_completed``) costs
the driver about as much CPU as submitting the task, which on a small machine
shows up directly as lost throughput.

A local Ray started here is confined to loopback.  Ray treats any requested
``127.0.0.1`` node address as "localhost" and swaps in the machine's external
address unless it runs in its local-only mode (the mode it uses on macOS and
Windows, switched by ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` and read once at
``import ray``).  In that mode the node address is 127.0.0.1, and Ray's GCS,
raylet, core-worker and runtime-env-agent servers bind only to it.  We apply that
mode around our own ``ray.init`` only, so a cluster the user attaches to later in
the process is unaffected.

Cancelling a running function kills its worker (``force=True``): Ray's
non-forced cancel only raises KeyboardInterrupt at the next bytecode, which
neither interrupts a blocking call nor survives ``except BaseException``.  A
running executable's command lives in a session of its own, so killing the
worker would orphan it; instead the command carries a marker in its environment
and the command's process group is killed wherever the marker is found.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import functools
import gc
import inspect
import logging
import os
import secrets
import shutil
import signal
import socket
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import ray
import ray.exceptions as rex
from ray._private import ray_constants
from ray.experimental import get_local_object_locations
from ray.util.client import ray as client_ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

import psutil  # isort: skip  (after ray, which can provide a vendored copy)

from .._util import run_in_thread
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
from ..worker import call_function, run_command

__all__ = ["RayExecutionBackend", "RayValue"]

log = logging.getLogger("asyncflow.ray")

C = Capability

#: Environment variable set on every command this adapter runs: "<token>/<uid>".
MARKER = "ASYNCFLOW_RAY_TASK"
#: Set in the environment of every process of a Ray this adapter starts.
_NODE_MARKER = "ASYNCFLOW_RAY_NODE"
_INLINE_LIMIT = 100 * 1024  # Ray's max_direct_call_object_size
_PEEK_LIMIT = 1024 * 1024  # results up to this size are read once to spot errors
_BATCH = 32  # completions worth one ray.get at once
_BATCH_DELAY = 0.05  # seconds a small batch may wait while every worker has a queue
_OWN_OPTIONS = frozenset({"num_returns", "max_retries", "retry_exceptions"})
_INIT_LOCK = threading.Lock()
_LOOPBACK = frozenset({"127.0.0.1", "::1", "::ffff:127.0.0.1"})


# -- worker side --------------------------------------------------------------
# Keyword naming how many trailing positional arguments are nested ObjectRefs.
_NESTED = "_asyncflow_nested_refs_"


class _Slot:
    """Stands for the n-th extra top-level argument, a nested ObjectRef."""

    __slots__ = ("index",)

    def __init__(self, index: int):
        self.index = index

    def __reduce__(self) -> tuple[type[_Slot], tuple[int]]:
        return (_Slot, (self.index,))


def _fill(obj: Any, values: Sequence[Any]) -> Any:
    t = type(obj)
    if t is _Slot:
        return values[obj.index]
    if t is tuple or t is list:
        return t(_fill(v, values) for v in obj)
    if t is dict:
        return {k: _fill(v, values) for k, v in obj.items()}
    if t is set or t is frozenset:
        return t(_fill(v, values) for v in obj)
    return obj


def _function_runner(
    fn: Callable[..., Any], is_async: bool, name: str, nested: bool = False
) -> Callable[..., Any]:
    if nested:

        def run(*args: Any, **kwargs: Any) -> Any:
            slots = kwargs.pop(_NESTED)
            if slots:
                values = args[-slots:]
                args = _fill(args[:-slots], values)
                kwargs = _fill(kwargs, values)
            return call_function(fn, args, kwargs, is_async, name)
    else:

        def run(*args: Any, **kwargs: Any) -> Any:
            return call_function(fn, args, kwargs, is_async, name)

        try:
            inspect.signature(fn)
        except (TypeError, ValueError):
            pass
        else:
            # Ray binds the arguments against the signature it finds: the
            # user's, so a wrong call fails at submit, and a call without
            # arguments takes Ray's cheapest path, as a plain remote would.
            run.__wrapped__ = fn  # type: ignore[attr-defined]
    run.__name__ = run.__qualname__ = name  # what Ray shows in logs and errors
    return run


def _run_command(command: Command, uid: str, name: str) -> str:
    return run_command(command, uid, name)


# Shared by every backend; Ray re-exports it to each new cluster or job.
_EXEC = ray.remote(max_retries=0)(_run_command)


def _sweep(prefix: str, targets: frozenset[str] | None) -> int:
    """SIGKILL, on this host, every process whose MARKER starts with ``prefix``
    (and is in ``targets`` if given), with the process group of each command."""
    own_group = os.getpgrp()
    killed = 0
    for proc in psutil.process_iter():
        try:
            mark = proc.environ().get(MARKER)
        except (psutil.Error, OSError):
            continue
        if (
            mark is None
            or not mark.startswith(prefix)
            or (targets is not None and mark not in targets)
        ):
            continue
        with contextlib.suppress(OSError):
            if os.getpgid(proc.pid) == proc.pid != own_group:
                os.killpg(proc.pid, signal.SIGKILL)  # the command and its group
            os.kill(proc.pid, signal.SIGKILL)
            killed += 1
    return killed


def _ignore(_: Any) -> None:
    pass


# -- driver side --------------------------------------------------------------
class RayValue(RemoteValue):
    """A task result kept in Ray's object store; ``handle`` is its ObjectRef."""

    __slots__ = ()

    async def fetch(self) -> Any:
        owner = self.owner
        assert isinstance(owner, RayExecutionBackend)
        return await owner._fetch(self.handle)


class _Task:
    __slots__ = ("command", "name", "ref")

    def __init__(self, name: str, ref: ray.ObjectRef, command: bool):
        self.name = name
        self.ref = ref
        self.command = command


class RayExecutionBackend:
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
    """

    def __init__(
        self,
        address: str | None = None,
        *,
        fail_infeasible: bool = True,
        loopback: bool = True,
        **init_kwargs: Any,
    ):
        self._address = address
        self._init_kwargs = dict(init_kwargs)
        self._fail_infeasible = fail_infeasible
        self._loopback = loopback and address is None
        self._token = secrets.token_hex(6)
        self._sink: CompletionSink | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: dict[str, _Task] = {}
        self._cancelled: dict[str, ray.ObjectRef] = {}
        self._ready_uids: collections.deque[str] = collections.deque()
        self._drain_scheduled = False
        self._deferred = False
        self._backlog = _BATCH
        self._client = False  # attached through Ray Client (ray://)
        self._runners: dict[Any, Any] = {}
        self._by_id: dict[int, tuple[Any, Any]] = {}  # unhashable callables
        self._variants: dict[Any, Any] = {}
        self._nodes: list[Mapping[str, float]] = []
        self._fetches: list[tuple[ray.ObjectRef, asyncio.Future[Any]]] = []
        self._jobs: set[asyncio.Task[Any]] = set()
        self._up: concurrent.futures.Future[None] | None = None
        self._stopped: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._owns = False  # we started this Ray and must stop it
        self._connected = False  # we called ray.init (attach) and must disconnect
        self._tmpdir: str | None = None
        self._env_saved: dict[str, str | None] = {}
        self._closed = False
        if address is None and not ray.is_initialized():
            cpus = init_kwargs.get("num_cpus") or _usable_cpus()
            self._init_kwargs["num_cpus"] = cpus
            self._info = self._make_info(
                cpus,
                init_kwargs.get("num_gpus") or 0,
                "not known until Ray has started",
            )
        elif ray.is_initialized():
            self._info = self._info_from_cluster()
        else:
            self._info = self._make_info(2, 0, "not known until attached")

    # -- info ---------------------------------------------------------------
    @property
    def info(self) -> BackendInfo:
        return self._info

    def _make_info(self, cpus: float, gpus: float, unknown: str = "") -> BackendInfo:
        caps = [
            C.FUNCTIONS,
            C.EXECUTABLES,
            C.CANCEL_RUNNING,
            C.KILL_EXECUTABLES,
            C.RESOURCES,
            C.SERIALIZES,
            C.LARGE_PAYLOADS,
            C.PIPELINE,
        ]
        absent: dict[str, str] = {}
        if cpus >= 2:
            caps.append(C.PARALLEL)
        else:
            absent["parallel"] = f"the Ray cluster has {cpus:g} CPU(s)"
        if gpus > 0:
            caps.append(C.GPUS)
        else:
            absent["gpus"] = unknown or "the Ray cluster has no GPUs"
        return BackendInfo(
            name="ray" if self._address is None else "ray-attached",
            runtime="ray",
            runtime_version=ray.__version__,
            capabilities=Capabilities.of(*caps, **absent),
        )

    def _info_from_cluster(self) -> BackendInfo:
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        self._nodes = nodes
        cpus = sum(n.get("CPU", 0) for n in nodes)
        self._backlog = max(_BATCH, int(2 * cpus))
        gpus = max((n.get("GPU", 0) for n in nodes), default=0)
        return self._make_info(cpus, gpus)

    @property
    def address(self) -> str | None:
        """The GCS address of the Ray in use (``host:port``), once started."""
        if not ray.is_initialized():
            return None
        try:
            return str(ray.get_runtime_context().gcs_address)
        except Exception:  # Ray Client has no GCS address to give
            return self._address

    # -- start --------------------------------------------------------------
    async def start(self, sink: CompletionSink) -> None:
        if self._closed:
            raise EngineClosedError("this RayExecutionBackend was shut down")
        self._sink = sink
        self._loop = asyncio.get_running_loop()
        if self._up is None:
            self._up = concurrent.futures.Future()
            self._thread = threading.Thread(
                target=self._own, name="asyncflow-ray", daemon=True
            )
            self._thread.start()
        try:
            # Shielded: an engine giving up on start must not cancel the thread's
            # future; shutdown() stops whatever the thread brings up.
            await asyncio.shield(asyncio.wrap_future(self._up))
        except BackendStartError:
            raise
        except Exception as exc:
            raise BackendStartError(
                f"Ray could not be {'attached' if self._address else 'started'}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc

    def _own(self) -> None:
        """The thread that calls ``ray.init`` and, later, ``ray.shutdown``.

        Ray binds the lifetime of the processes ``ray.init`` starts to the thread
        that started them (PR_SET_PDEATHSIG), so that thread must outlive them.
        """
        assert self._up is not None
        try:
            with _INIT_LOCK:
                if ray.is_initialized():
                    pass  # share this process's connection; never shut it down
                elif self._address is not None:
                    ray.init(address=self._address, **self._init_kwargs)
                    self._connected = True
                else:
                    self._start_local()
            self._client = client_ray.is_connected()
            self._info = self._info_from_cluster()
        except BaseException as exc:
            with contextlib.suppress(BaseException):
                self._shutdown_blocking()  # whatever got started before the failure
            self._up.set_exception(exc)
            self._stopped.set_result(None)
            return
        self._up.set_result(None)
        self._stop.wait()
        try:
            self._shutdown_blocking()
        except BaseException as exc:
            self._stopped.set_exception(exc)
        else:
            self._stopped.set_result(None)

    def _start_local(self) -> None:
        base = tempfile.gettempdir()
        if len(base) > 40:  # Ray's unix sockets live below it (107-byte limit)
            base = "/tmp"
        self._tmpdir = tempfile.mkdtemp(prefix="asyncflow-ray-", dir=base)
        env = {"RAY_USAGE_STATS_ENABLED": "0"}
        if not any(
            k in os.environ
            for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
        ):
            # Ray 2.60 turns token auth on (setting RAY_AUTH_MODE itself) and
            # writes ~/.ray/auth_token; point it at a token in our temp dir.
            path = os.path.join(self._tmpdir, "auth_token")
            with open(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
                f.write(secrets.token_hex(32))
            env["RAY_AUTH_TOKEN_PATH"] = path
        for key in (*env, "RAY_AUTH_MODE"):  # Ray itself sets RAY_AUTH_MODE
            self._env_saved.setdefault(key, os.environ.get(key))
        os.environ.update(env)
        _forget_cached_token()
        kwargs = {
            "include_dashboard": False,
            "_temp_dir": self._tmpdir,
            **self._init_kwargs,
        }
        loopback = self._loopback and "_node_ip_address" not in kwargs
        for attempt in (1, 2):
            with _local_only(loopback), _quiet_init(), self._marking_children():
                try:
                    ray.init(**kwargs)
                    break
                except Exception as exc:
                    failure = f"{type(exc).__name__}: {exc}"
                    # Let go of Ray's half-built node (and its Popen objects)
                    # while its warnings are silenced.
                    exc.__traceback__ = None
                    del exc
                    self._kill_partial_start()
                    gc.collect()
            # Ray gives the raylet a fixed 30 s to register with the GCS; a busy
            # machine can miss that once.
            if attempt == 1 and "timed out during startup" in failure:
                log.warning("Ray did not start within its 30 s; retrying once")
                continue
            self._restore_env()
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None
            raise BackendStartError(f"Ray could not be started: {failure}")
        self._owns = True

    @contextlib.contextmanager
    def _marking_children(self) -> Iterator[None]:
        """Every process ``ray.init`` starts, and everything those start (the
        raylet's workers and agents), inherits this marker: how we find them all
        at shutdown, even ones orphaned by a crash.  Only set while ``ray.init``
        runs, so the application's own subprocesses do not carry it."""
        saved = os.environ.get(_NODE_MARKER)
        os.environ[_NODE_MARKER] = self._token
        try:
            yield
        finally:
            if saved is None:
                os.environ.pop(_NODE_MARKER, None)
            else:
                os.environ[_NODE_MARKER] = saved

    def _kill_partial_start(self) -> None:
        with contextlib.suppress(Exception):
            ray.shutdown()
        self._kill_leftovers(grace=0)

    def _kill_leftovers(self, grace: float) -> None:
        """Give our Ray's processes ``grace`` seconds to exit, then SIGKILL
        them; twice, in case a dying raylet started one more."""
        for _ in range(2):
            procs = self._ray_processes()
            if not procs:
                return
            _, alive = psutil.wait_procs(procs, timeout=grace)
            for proc in alive:
                with contextlib.suppress(psutil.Error):
                    proc.kill()
            psutil.wait_procs(alive, timeout=5)

    # -- submit -------------------------------------------------------------
    def submit(self, specs: Sequence[TaskSpec]) -> None:
        sink = self._sink
        assert sink is not None
        tasks = self._tasks
        submitted: list[tuple[str, ray.ObjectRef]] = []
        for spec in specs:
            try:
                remote = self._remote_for(spec)
                if spec.command is not None:
                    cmd = spec.command
                    marked = Command(
                        cmd.argv,
                        {**(cmd.env or {}), MARKER: f"{self._token}/{spec.uid}"},
                        cmd.cwd,
                    )
                    ref = remote.remote(marked, spec.uid, spec.name)
                elif spec.has_remote_args:
                    args, kwargs = self._native_args(spec)
                    ref = remote.remote(*args, **kwargs)
                else:
                    ref = remote.remote(*spec.args, **spec.kwargs)
            except (
                ResourceUnavailableError,
                TaskDefinitionError,
                SerializationError,
                UpstreamGone,
            ) as exc:
                sink.set_exception(spec.uid, exc)
                continue
            except Exception as exc:
                sink.set_exception(spec.uid, self._submit_error(spec, exc))
                continue
            tasks[spec.uid] = _Task(spec.name, ref, spec.command is not None)
            submitted.append((spec.uid, ref))
        # Callbacks only once the whole batch is in: while this loop holds the
        # GIL, a callback would stall the Ray thread that dispatches the tasks.
        if self._client:
            for uid, ref in submitted:
                ref._on_completed(functools.partial(self._on_client_value, uid))
        else:
            on_ready = self._on_ready
            for uid, ref in submitted:
                ref._on_ready(functools.partial(on_ready, uid))

    def _remote_for(self, spec: TaskSpec) -> Any:
        res = spec.resources
        extra = spec.options.get("ray") if spec.options else None
        if spec.command is not None:
            base: Any = _EXEC
            key: Any = "exec"
        else:
            base, key = self._runner(spec)
        if res.is_default and not extra:
            return base
        if not res.is_default:
            self._check_resources(spec, res)
        if extra:
            return base.options(**self._task_options(spec, res, extra))
        variant = self._variants.get((key, res))
        if variant is None:
            variant = self._variants[(key, res)] = base.options(
                **self._task_options(spec, res, None)
            )
        return variant

    def _runner(self, spec: TaskSpec) -> tuple[Any, Any]:
        fn = spec.function
        nested = spec.has_remote_args  # may need the variant taking nested refs
        key: Any = (fn, spec.is_async, spec.name, nested)
        try:
            remote = self._runners.get(key)
        except TypeError:  # an unhashable callable object
            key = (id(fn), spec.is_async, spec.name, nested)
            entry = self._by_id.get(key)
            if entry is None or entry[0] is not fn:
                entry = self._by_id[key] = (fn, self._wrap(spec, nested))
            return entry[1], key
        if remote is None:
            remote = self._runners[key] = self._wrap(spec, nested)
        return remote, key

    @staticmethod
    def _wrap(spec: TaskSpec, nested: bool) -> Any:
        assert spec.function is not None
        runner = _function_runner(spec.function, spec.is_async, spec.name, nested)
        return ray.remote(max_retries=0)(runner)

    def _task_options(
        self, spec: TaskSpec, res: Resources, extra: Mapping[str, Any] | None
    ) -> dict[str, Any]:
        opts: dict[str, Any] = {"num_cpus": res.cores}
        if res.gpus:
            opts["num_gpus"] = res.gpus
        if res.memory:
            opts["memory"] = res.memory * 1024 * 1024
        if extra:
            if not isinstance(extra, Mapping) or _OWN_OPTIONS & set(extra):
                raise TaskDefinitionError(
                    f"task {spec.name!r}: options['ray'] must be a dict of Ray task "
                    f"options other than {sorted(_OWN_OPTIONS)} (asyncflow owns "
                    "returns and retries)"
                )
            opts.update(extra)
        return opts

    def _check_resources(self, spec: TaskSpec, res: Resources) -> None:
        if res.ranks > 1:
            raise ResourceUnavailableError(
                f"task {spec.name!r} asks for {res.ranks} MPI ranks; the Ray "
                "backend launches no MPI jobs: route it to an MPI-capable backend"
            )
        if not self._fail_infeasible:
            return
        need = {
            "CPU": res.cores,
            "GPU": res.gpus,
            "memory": (res.memory or 0) * 1024 * 1024,
        }
        for node in self._nodes:
            if all(node.get(k, 0) >= v for k, v in need.items() if v):
                return
        have = (
            ", ".join(
                f"{{CPU: {n.get('CPU', 0):g}, GPU: {n.get('GPU', 0):g}, "
                f"memory: {n.get('memory', 0) / 2**20:.0f} MB}}"
                for n in self._nodes
            )
            or "no alive node"
        )
        raise ResourceUnavailableError(
            f"task {spec.name!r} asks for cores={res.cores}, gpus={res.gpus}, "
            f"memory={res.memory} MB, which no node of this Ray cluster has "
            f"({have}); Ray would wait forever. Lower the request, or pass "
            "fail_infeasible=False for an autoscaling cluster"
        )

    def _native_args(self, spec: TaskSpec) -> tuple[tuple[Any, ...], dict[str, Any]]:
        nested: list[ray.ObjectRef] = []

        def native(obj: Any, top: bool) -> Any:
            t = type(obj)
            if t is RayValue or t is UpstreamRef:
                if obj.owner is not self:  # pragma: no cover - engine fetches these
                    raise TaskDefinitionError(
                        f"task {spec.name!r}: got a value from another backend"
                    )
                if t is RayValue:
                    handle = obj.handle
                else:  # a task still running here (Capability.PIPELINE)
                    running = self._tasks.get(obj.uid)
                    if running is None:
                        raise UpstreamGone(obj.uid)
                    handle = running.ref
                if top:
                    return handle
                nested.append(handle)
                return _Slot(len(nested) - 1)
            if t is tuple or t is list:
                return t(native(v, False) for v in obj)
            if t is dict:
                return {k: native(v, False) for k, v in obj.items()}
            if t is set or t is frozenset:
                return t(native(v, False) for v in obj)
            return obj

        args = tuple(native(a, True) for a in spec.args)
        kwargs = {k: native(v, True) for k, v in spec.kwargs.items()}
        kwargs[_NESTED] = len(nested)
        return args + tuple(nested), kwargs

    @staticmethod
    def _submit_error(spec: TaskSpec, exc: Exception) -> BaseException:
        text = str(exc)
        if isinstance(exc, TypeError) and "serializ" in text.lower():
            what = (
                "its function"
                if "function" in text.split("\n", 1)[0]
                else "an argument"
            )
            return SerializationError(
                f"task {spec.name!r}: {what} cannot be serialised for Ray "
                f"({text.splitlines()[0]}); define functions at module level and "
                "do not capture locks, sockets or open files"
            )
        if isinstance(exc, ValueError) and "resource" in text.lower():
            return ResourceUnavailableError(f"task {spec.name!r}: {text}")
        if isinstance(exc, TypeError):  # the arguments do not fit the signature
            return TaskDefinitionError(f"task {spec.name!r} was called wrongly: {text}")
        return exc

    # -- completions ----------------------------------------------------------
    def _on_ready(self, uid: str, _exc: BaseException | None) -> None:
        """On Ray's thread: the task's return object exists (value or error)."""
        self._ready_uids.append(uid)
        if not self._drain_scheduled:
            self._drain_scheduled = True
            assert self._loop is not None
            with contextlib.suppress(RuntimeError):  # the loop is closed
                self._loop.call_soon_threadsafe(self._drain)

    def _on_client_value(self, uid: str, value: Any) -> None:
        """Ray Client (``ray://``): the proxy has no object store here, so the
        value (or error) comes back with the completion."""
        task = self._tasks.pop(uid, None)
        if task is None:
            self._cancelled.pop(uid, None)
            return
        sink = self._sink
        assert sink is not None
        if isinstance(value, rex.RayError):
            sink.set_exception(uid, _task_error(task.name, value))
        else:
            sink.set_result(uid, value)

    def _drain(self) -> None:
        """On the loop: report every task that became ready since the last turn.

        Small values (and errors) were sent back inline and sit in this
        process's memory, so one ``ray.get`` for the batch returns at once.  A
        value Ray placed in its shared-memory store (over 100 KiB) stays there:
        the engine gets a RayValue for it.
        """
        ready = self._ready_uids
        if (
            not self._deferred
            and len(ready) < _BATCH
            and len(self._tasks) - len(ready) >= self._backlog
        ):
            # Every worker has queued work behind the running task, so reporting
            # a little later idles nobody, while each wake-up and ray.get here
            # costs the driver about as much CPU as a task submission.  Collect
            # the completions of the next few milliseconds into one batch.  (A
            # chain, or anything with little queued, is never delayed.)
            self._deferred = True
            assert self._loop is not None
            self._loop.call_later(_BATCH_DELAY, self._drain)
            return
        self._deferred = False
        self._drain_scheduled = False
        uids = []
        while ready:
            uids.append(ready.popleft())
        done: list[tuple[str, _Task]] = []
        dropped: list[ray.ObjectRef] = []
        for uid in uids:
            task = self._tasks.pop(uid, None)
            if task is not None:
                done.append((uid, task))
            else:
                ref = self._cancelled.pop(uid, None)
                if ref is not None:
                    dropped.append(ref)
        if dropped:
            _get_now(dropped)  # read the errors so Ray does not log them
        if not done:
            return
        sink = self._sink
        assert sink is not None
        locations = get_local_object_locations([task.ref for _, task in done])
        read: list[tuple[str, _Task, bool]] = []
        for uid, task in done:
            where = locations.get(task.ref) or {}
            size = where.get("object_size") or 0
            if not where.get("node_ids") and size <= _INLINE_LIMIT:
                read.append((uid, task, True))
            elif size <= _PEEK_LIMIT:
                # In the shared store but small: most likely a value, yet an
                # error with a long message lands here too.  Reading it once is
                # cheap and keeps failures failures; the value stays remote.
                read.append((uid, task, False))
            else:
                sink.set_result(uid, RayValue(self, task.ref))
        if not read:
            return
        outcomes = _get_now([task.ref for _, task, _ in read])
        for (uid, task, inline), (ok, value) in zip(read, outcomes, strict=True):
            if ok:
                sink.set_result(uid, value if inline else RayValue(self, task.ref))
            elif isinstance(value, rex.GetTimeoutError):  # pragma: no cover
                # Not actually local yet: let a fetch wait for it off the loop.
                sink.set_result(uid, RayValue(self, task.ref))
            else:
                sink.set_exception(uid, _task_error(task.name, value))

    # -- cancel -------------------------------------------------------------
    def cancel(self, uids: Sequence[str]) -> None:
        commands = []
        for uid in uids:
            task = self._tasks.pop(uid, None)
            if task is None:
                continue
            self._cancelled[uid] = task.ref
            try:
                # A command is stopped by killing its process group below; the
                # worker may live on.  A function can only be stopped with it.
                ray.cancel(task.ref, force=not task.command, recursive=True)
            except Exception:  # already finished or Ray is going away
                log.debug("ray.cancel(%s) failed", uid, exc_info=True)
            if task.command:
                commands.append(f"{self._token}/{uid}")
        if commands and self._loop is not None:
            self._spawn(self._kill_commands(frozenset(commands)))

    def _spawn(self, coro: Any) -> None:
        job = asyncio.ensure_future(coro)
        self._jobs.add(job)
        job.add_done_callback(self._jobs.discard)

    async def _kill_commands(self, targets: frozenset[str] | None) -> None:
        # Twice: a command may start in the instant between the first sweep and
        # Ray's cancel reaching its worker.
        for delay in (0.0, 1.0):
            await asyncio.sleep(delay)
            try:
                await run_in_thread(
                    self._sweep_everywhere, targets, name="asyncflow-ray-kill"
                )
            except Exception:
                log.warning("could not kill cancelled Ray commands", exc_info=True)

    def _sweep_everywhere(self, targets: frozenset[str] | None) -> None:
        prefix = f"{self._token}/"
        _sweep(prefix, targets)  # this host: cheap, and covers a local Ray
        if self._owns or not ray.is_initialized():
            return
        here = _local_addresses()
        remote_sweep = ray.remote(num_cpus=0, max_retries=0)(_sweep)
        for node in ray.nodes():
            if node.get("Alive") and node.get("NodeManagerAddress") not in here:
                ref = remote_sweep.options(
                    scheduling_strategy=NodeAffinitySchedulingStrategy(
                        node["NodeID"], soft=False
                    )
                ).remote(prefix, targets)
                ref._on_completed(_ignore)

    # -- fetch ----------------------------------------------------------------
    async def _fetch(self, ref: ray.ObjectRef) -> Any:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        if not self._fetches:
            loop.call_soon(self._flush_fetches)
        self._fetches.append((ref, fut))
        return await fut

    def _flush_fetches(self) -> None:
        batch, self._fetches = self._fetches, []
        if batch:
            self._spawn(self._fetch_batch(batch))

    async def _fetch_batch(
        self, batch: list[tuple[ray.ObjectRef, asyncio.Future[Any]]]
    ) -> None:
        try:
            outcomes = await run_in_thread(
                _get_many, [r for r, _ in batch], name="asyncflow-ray-fetch"
            )
        except BaseException as exc:
            outcomes = [(False, exc)] * len(batch)
        for (_, fut), (ok, value) in zip(batch, outcomes, strict=True):
            if fut.done():
                continue
            if ok:
                fut.set_result(value)
            else:
                fut.set_exception(
                    _task_error("(fetch)", value)
                    if isinstance(value, rex.RayError)
                    else value
                )

    # -- shutdown -------------------------------------------------------------
    async def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        leftover = list(self._tasks)
        if leftover:
            self.cancel(leftover)
        for job in list(self._jobs):
            with contextlib.suppress(BaseException):
                await job
        for _, fut in self._fetches:
            fut.cancel()
        self._fetches.clear()
        try:
            if self._up is not None:
                self._stop.set()
                await asyncio.shield(asyncio.wrap_future(self._stopped))
                assert self._thread is not None
                self._thread.join()
        finally:
            self._runners.clear()
            self._by_id.clear()
            self._variants.clear()

    def _shutdown_blocking(self) -> None:
        prefix = f"{self._token}/"
        if not self._owns:
            if ray.is_initialized():
                with contextlib.suppress(Exception):
                    self._sweep_everywhere(None)
            if self._connected:
                with _INIT_LOCK:
                    ray.shutdown()
            return
        with _INIT_LOCK:
            try:
                ray.shutdown(wait_for_processes=True)
            finally:
                # Workers exit once they notice the raylet is gone; give them a
                # moment, then kill whatever is left (commands included).
                self._kill_leftovers(grace=5)
                _sweep(prefix, None)
                self._restore_env()
                _forget_cached_token()
                if self._tmpdir is not None:
                    shutil.rmtree(self._tmpdir, ignore_errors=True)
                    self._tmpdir = None
                self._owns = False

    def _ray_processes(self) -> list[psutil.Process]:
        """Every live process of the Ray this backend started: those carrying
        our marker (see ``_marking_children``), their descendants, and any
        ``ray::`` process holding a file in our temp dir.  (Workers and agents
        rename themselves with setproctitle, which can hide their environment;
        an agent orphaned by a crashed raylet is found by its open log file.)"""
        if self._tmpdir is None:
            return []
        found: dict[int, psutil.Process] = {}
        me = os.getpid()
        for proc in psutil.process_iter(["name"]):
            if proc.pid == me:
                continue
            try:
                if proc.environ().get(_NODE_MARKER) == self._token:
                    found[proc.pid] = proc
                    found.update((c.pid, c) for c in proc.children(recursive=True))
                elif (
                    proc.pid not in found
                    and (proc.info["name"] or "").startswith("ray::")
                    and any(f.path.startswith(self._tmpdir) for f in proc.open_files())
                ):
                    found[proc.pid] = proc
            except (psutil.Error, OSError):
                continue
        return list(found.values())

    def _restore_env(self) -> None:
        for key, value in self._env_saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        self._env_saved.clear()


# -- helpers --------------------------------------------------------------------
def _task_error(name: str, err: rex.RayError) -> BaseException:
    """The user's own exception for a task failure; WorkerLostError when Ray
    lost the worker, the node or the object."""
    if isinstance(err, rex.RayTaskError):
        cause = err.cause
        if isinstance(cause, RuntimeError) and "failed to import on the worker" in str(
            cause
        ):
            return SerializationError(
                f"task {name!r}: its function could not be loaded on the Ray worker "
                f"({str(cause).splitlines()[0]}); define it in a module the workers "
                "can import, or register the module with "
                "ray.cloudpickle.register_pickle_by_value"
            )
        if isinstance(cause, BaseException) and not isinstance(cause, rex.RayError):
            return cause
        if isinstance(cause, rex.RayError):
            err = cause
        else:
            return err
    if isinstance(err, rex.TaskCancelledError):
        return WorkerLostError(
            f"task {name!r} was cancelled inside Ray, not through asyncflow ({err})"
        )
    if isinstance(err, rex.OutOfMemoryError):
        return WorkerLostError(
            f"task {name!r}: Ray killed its worker because the node ran out of "
            f"memory; ask for more with resources={{'memory': MB}} ({err})"
        )
    if isinstance(err, rex.ObjectLostError):
        return WorkerLostError(
            f"task {name!r}: a value it needs was lost from "
            f"Ray's object store ({type(err).__name__}: {err})"
        )
    if isinstance(
        err,
        rex.RaySystemError
        | rex.WorkerCrashedError
        | rex.NodeDiedError
        | rex.LocalRayletDiedError,
    ):
        return WorkerLostError(
            f"task {name!r}: the Ray worker running it died "
            f"({type(err).__name__}: {err})"
        )
    return err


def _get_now(refs: list[ray.ObjectRef]) -> list[tuple[bool, Any]]:
    """Values of ready, local objects, without waiting; errors as values."""
    try:
        return [(True, v) for v in ray.get(refs, timeout=0)]
    except Exception:
        pass
    out: list[tuple[bool, Any]] = []
    for ref in refs:
        try:
            out.append((True, ray.get(ref, timeout=0)))
        except Exception as exc:
            out.append((False, exc))
    return out


def _get_many(refs: list[ray.ObjectRef]) -> list[tuple[bool, Any]]:
    try:
        return [(True, v) for v in ray.get(refs)]
    except Exception:
        pass
    out: list[tuple[bool, Any]] = []
    for ref in refs:
        try:
            out.append((True, ray.get(ref)))
        except Exception as exc:
            out.append((False, exc))
    return out


@contextlib.contextmanager
def _local_only(enabled: bool) -> Iterator[None]:
    """Run ``ray.init`` in Ray's local-only mode, which keeps a new node on
    127.0.0.1 (see the module docstring)."""
    if not enabled:
        yield
        return
    saved = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved


class _DropSigtermWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("SIGTERM handler is not set")


@contextlib.contextmanager
def _quiet_init() -> Iterator[None]:
    """Silence two things ``ray.init`` says that are not the user's concern.

    From our thread it logs that it cannot install its SIGTERM handler (leaving
    the application's signal handling alone is what we want).  When a start
    fails (the raylet missing Ray's fixed 30 s registration window on a busy
    machine), Ray drops its ``Popen`` objects before anyone can stop the
    processes, so each warns that it is "still running"; we kill them just after.
    """
    logger = logging.getLogger("ray._private.worker")
    flt = _DropSigtermWarning()
    logger.addFilter(flt)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", r"subprocess \d+ is still running", ResourceWarning
            )
            yield
    finally:
        logger.removeFilter(flt)


def _forget_cached_token() -> None:
    """Ray caches the auth token for the life of the process; a Ray started
    later with another token would reject this driver."""
    loader = getattr(ray._raylet, "AuthenticationTokenLoader", None)
    if loader is not None:
        loader.instance().reset_cache()


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS, Windows
        return os.cpu_count() or 1


def _local_addresses() -> set[str]:
    addrs = set(_LOOPBACK) | {socket.gethostname()}
    for entries in psutil.net_if_addrs().values():
        addrs.update(e.address for e in entries)
    return addrs


# What a default local Ray offers, for listings that must not start Ray.
RayExecutionBackend.CAPABILITIES = Capabilities.of(  # type: ignore[attr-defined]
    C.FUNCTIONS,
    C.EXECUTABLES,
    C.CANCEL_RUNNING,
    C.KILL_EXECUTABLES,
    C.RESOURCES,
    C.SERIALIZES,
    C.LARGE_PAYLOADS,
    C.PIPELINE,
    C.PARALLEL,
    gpus="depends on the cluster: declared when a node reports GPUs",
)
