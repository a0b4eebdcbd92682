"""RayExecutionBackend itself: its construction, start, cancel and shutdown.

The protocol's lifecycle lives here: what the backend declares before and
after Ray is up, handing ``ray.init`` to the owner thread (``process``),
cancelling tasks (forcing functions, killing commands' process groups) and
shutting down.  Submission and results are the mixins it is built from
(``submit``, ``results``).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import secrets
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import ray

from ... import _signals
from ...errors import BackendStartError, EngineClosedError
from ...protocol import BackendInfo, Capabilities, Capability, CompletionSink
from .._awaitable import AwaitableBackend
from .base import _Task, log
from .errors import _attach_hint
from .process import _auth_mode_is_token, _ProcessMixin, _usable_cpus
from .results import _BATCH, _ResultsMixin
from .submit import _SubmitMixin
from .watch import _WatchMixin

C = Capability


class RayExecutionBackend(
    _SubmitMixin, _ResultsMixin, _ProcessMixin, _WatchMixin, AwaitableBackend
):
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
        self._pidfds: list[int] = []
        self._lost: str | None = None  # why Ray is gone (see watch.py)
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
            C.CANCEL_QUEUED,
            C.CANCEL_RUNNING,
            C.KILL_EXECUTABLES,
            C.RESOURCES,
            C.SERIALIZES,
            C.LARGE_PAYLOADS,
            C.PIPELINE,
        ]
        absent: dict[str, str] = {"reports_running": _NO_RUNNING}
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
            hint = (
                _attach_hint(self._address, exc, _auth_mode_is_token())
                if self._address
                else None
            )
            raise BackendStartError(
                f"Ray could not be {'attached' if self._address else 'started'}: "
                f"{type(exc).__name__}: {exc}" + (f"; {hint}" if hint else "")
            ) from exc
        # ray.init put its C++ failure-signal handler on SIGTERM, which aborts
        # the driver instead of letting the engine shut down.
        _signals.restore_handlers()
        self._watch_head()

    # -- cancel -------------------------------------------------------------
    def cancel(self, uids: Sequence[str]) -> None:
        commands = []
        # Ray 2.60 aborts the driver (ReferenceCounter CHECK failure) when a task
        # still resolving its arguments is cancelled and they resolve later.  A
        # piped task whose upstreams are in flight is left alone: it fails with
        # them or runs unseen; its report is dropped like any cancelled one's.
        tasks = self._tasks
        resolving = {
            uid
            for uid in uids
            if (task := tasks.get(uid)) is not None
            and any(u in tasks for u in task.upstreams)
        }
        for uid in uids:
            task = self._tasks.pop(uid, None)
            if task is None:
                continue
            self._cancelled[uid] = task.ref
            if uid in resolving:
                continue
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

    # -- shutdown -------------------------------------------------------------
    async def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._unwatch_head()
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


_NO_RUNNING = "Ray tells the driver only how a task ended"

# What a default local Ray offers, for listings that must not start Ray.
RayExecutionBackend.CAPABILITIES = Capabilities.of(  # type: ignore[attr-defined]
    C.FUNCTIONS,
    C.EXECUTABLES,
    C.CANCEL_QUEUED,
    C.CANCEL_RUNNING,
    C.KILL_EXECUTABLES,
    C.RESOURCES,
    C.SERIALIZES,
    C.LARGE_PAYLOADS,
    C.PIPELINE,
    C.PARALLEL,
    gpus="depends on the cluster: declared when a node reports GPUs",
    reports_running=_NO_RUNNING,
)
