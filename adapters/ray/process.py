"""The Ray runtime's processes: starting, stopping, finding and killing them.

Ray ties the processes ``ray.init`` starts to the thread that started them, so
a thread of ours calls ``ray.init`` and, at shutdown, ``ray.shutdown``.  A
local Ray is kept on loopback, given a private temp dir and auth token, and its
processes are marked so that every one of them (crashed raylets' orphans
included) is found and killed at shutdown.  Commands are found by the marker
in their environment (see ``worker``), on every node.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import gc
import logging
import os
import secrets
import socket
import tempfile
import threading
import warnings
from collections.abc import Iterator
from typing import Any

import ray
from ray._private import ray_constants
from ray.util.client import ray as client_ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

import psutil  # isort: skip  (after ray, which can provide a vendored copy)

from ...errors import BackendStartError
from ..toolkit import Scratch
from ..toolkit.envelopes import strip_tracebacks
from .attach import check_attach, start_error
from .state import RayState, log
from .worker import sweep

__all__ = ["RayProcess", "sweep_everywhere", "usable_cpus"]

#: Set in the environment of every process of a Ray this adapter starts.
_NODE_MARKER = "ASYNCFLOW_RAY_NODE"
_INIT_LOCK = threading.Lock()
_LOOPBACK = frozenset({"127.0.0.1", "::1", "::ffff:127.0.0.1"})


class RayProcess:
    """The owner thread, and the processes of the Ray it brings up.

    ``owns`` is set while this backend's own local Ray runs (it must stop it);
    ``scratch`` is that Ray's temp dir, which also identifies its processes.
    """

    def __init__(self, state: RayState):
        self._state = state
        self._up: concurrent.futures.Future[None] | None = None
        self._stopped: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.owns = False
        self._connected = False  # we called ray.init (attach) and must disconnect
        self.scratch = Scratch()
        self._env_saved: dict[str, str | None] = {}

    async def start(self) -> None:
        """Bring Ray up (or attach) on the owner thread, started on first call."""
        if self._up is None:
            self._up = concurrent.futures.Future()
            self._thread = threading.Thread(
                target=self._own, name="asyncflow-ray", daemon=True
            )
            self._thread.start()
        try:
            # Shielded: an engine giving up on start must not cancel the thread's
            # future; stop() stops whatever the thread brings up.
            await asyncio.shield(asyncio.wrap_future(self._up))
        except BackendStartError:
            raise
        except Exception as exc:
            raise start_error(self._state.address, exc) from exc

    async def stop(self) -> None:
        """Have the owner thread shut Ray down (or disconnect), and join it."""
        if self._up is None:
            return
        self._stop.set()
        await asyncio.shield(asyncio.wrap_future(self._stopped))
        assert self._thread is not None
        self._thread.join()

    def _own(self) -> None:
        """The thread that calls ``ray.init`` and, later, ``ray.shutdown``.

        Ray binds the lifetime of the processes ``ray.init`` starts to the thread
        that started them (PR_SET_PDEATHSIG), so that thread must outlive them.
        """
        assert self._up is not None
        state = self._state
        try:
            with _INIT_LOCK:
                if ray.is_initialized():
                    pass  # share this process's connection; never shut it down
                elif state.address is not None:
                    check_attach(state.address)
                    ray.init(address=state.address, **state.init_kwargs)
                    self._connected = True
                else:
                    self._start_local()
            state.client = client_ray.is_connected()
            state.read_cluster()
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
        # Ray's unix sockets live 85 bytes below it, within a 107-byte limit.
        if len(base) > 20:
            base = "/tmp"
        tmpdir = self.scratch.make("asyncflow-ray-", base)
        self._set_env(tmpdir)
        kwargs = {
            "include_dashboard": False,
            "_temp_dir": tmpdir,
            **self._state.init_kwargs,
        }
        loopback = self._state.loopback and "_node_ip_address" not in kwargs
        for attempt in (1, 2):
            with _local_only(loopback), _quiet_init(), self._marking_children():
                try:
                    ray.init(**kwargs)
                    break
                except Exception as exc:
                    failure = f"{type(exc).__name__}: {exc}"
                    # Let go of Ray's half-built node (and its Popen objects)
                    # while its warnings are silenced.
                    strip_tracebacks(exc)
                    del exc
                    self._kill_partial_start()
                    gc.collect()
            # Ray gives the raylet a fixed 30 s to register with the GCS; a busy
            # machine can miss that once.
            if attempt == 1 and "timed out during startup" in failure:
                log.warning("Ray did not start within its 30 s; retrying once")
                continue
            self._restore_env()
            self.scratch.close()
            raise BackendStartError(f"Ray could not be started: {failure}")
        self.owns = True

    def _set_env(self, tmpdir: str) -> None:
        """Usage stats off, and Ray's auth token in our temp dir; the previous
        values are restored at shutdown."""
        env = {"RAY_USAGE_STATS_ENABLED": "0"}
        if not any(
            k in os.environ
            for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
        ):
            # Ray 2.60 turns token auth on (setting RAY_AUTH_MODE itself) and
            # writes ~/.ray/auth_token; point it at a token in our temp dir.
            path = os.path.join(tmpdir, "auth_token")
            with open(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
                f.write(secrets.token_hex(32))
            env["RAY_AUTH_TOKEN_PATH"] = path
        for key in (*env, "RAY_AUTH_MODE"):  # Ray itself sets RAY_AUTH_MODE
            self._env_saved.setdefault(key, os.environ.get(key))
        os.environ.update(env)
        _forget_cached_token()

    @contextlib.contextmanager
    def _marking_children(self) -> Iterator[None]:
        """Every process ``ray.init`` starts, and everything those start (the
        raylet's workers and agents), inherits this marker: how we find them all
        at shutdown, even ones orphaned by a crash.  The workers also list their
        commands, and write their output, in our temp dir, so that a command
        whose worker was killed leaves nothing behind either.  Only set while
        ``ray.init`` runs, so the application's own subprocesses do not carry
        them."""
        marks = {_NODE_MARKER: self._state.token, **self.scratch.command_env()}
        saved = {name: os.environ.get(name) for name in marks}
        os.environ.update(marks)
        try:
            yield
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value

    def _kill_partial_start(self) -> None:
        with contextlib.suppress(Exception):
            ray.shutdown()
        self._kill_leftovers(grace=0)

    def _kill_leftovers(self, grace: float) -> None:
        """Give our Ray's processes ``grace`` seconds to exit, then SIGKILL
        them; twice, in case a dying raylet started one more."""
        for _ in range(2):
            procs = self.ray_processes()
            if not procs:
                return
            _, alive = psutil.wait_procs(procs, timeout=grace)
            for proc in alive:
                with contextlib.suppress(psutil.Error):
                    proc.kill()
            psutil.wait_procs(alive, timeout=5)

    def _shutdown_blocking(self) -> None:
        state = self._state
        if not self.owns:
            if ray.is_initialized() and state.lost is None:  # else it waits on GCS
                with contextlib.suppress(Exception):
                    sweep_everywhere(state.token, None, remote=True)
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
                sweep(f"{state.token}/", None)
                self._restore_env()
                _forget_cached_token()
                self.scratch.close()
                self.owns = False

    def ray_processes(self) -> list[psutil.Process]:
        """Every live process of the Ray this backend started: those carrying
        our marker (see ``_marking_children``), their descendants, and any
        ``ray::`` process holding a file in our temp dir.  (Workers and agents
        rename themselves with setproctitle, which can hide their environment;
        an agent orphaned by a crashed raylet is found by its open log file.)"""
        tmpdir = self.scratch.path
        if tmpdir is None:
            return []
        token = self._state.token
        found: dict[int, psutil.Process] = {}
        me = os.getpid()
        for proc in psutil.process_iter(["name"]):
            if proc.pid == me:
                continue
            try:
                if proc.environ().get(_NODE_MARKER) == token:
                    found[proc.pid] = proc
                    found.update((c.pid, c) for c in proc.children(recursive=True))
                elif (
                    proc.pid not in found
                    and (proc.info["name"] or "").startswith("ray::")
                    and any(f.path.startswith(tmpdir) for f in proc.open_files())
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


@contextlib.contextmanager
def _local_only(enabled: bool) -> Iterator[None]:
    """Run ``ray.init`` in Ray's local-only mode, which keeps a new node on
    127.0.0.1 (see the docstring of ``asyncflow.adapters.ray``)."""
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


def usable_cpus() -> int:
    """The CPUs this process may run on: what a local Ray gets by default."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS, Windows
        return os.cpu_count() or 1


def sweep_everywhere(token: str, targets: frozenset[str] | None, remote: bool) -> None:
    """Kill this backend's marked commands (those in ``targets`` if given) on
    this host and, if ``remote``, on every other alive node of the cluster."""
    prefix = f"{token}/"
    sweep(prefix, targets)  # this host: cheap, and covers a local Ray
    if not remote or not ray.is_initialized():
        return
    here = _local_addresses()
    remote_sweep = ray.remote(num_cpus=0, max_retries=0)(sweep)
    for node in ray.nodes():
        if node.get("Alive") and node.get("NodeManagerAddress") not in here:
            ref = remote_sweep.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(
                    node["NodeID"], soft=False
                )
            ).remote(prefix, targets)
            ref._on_completed(_ignore)


def _ignore(_: Any) -> None:
    pass


def _local_addresses() -> set[str]:
    addrs = set(_LOOPBACK) | {socket.gethostname()}
    for entries in psutil.net_if_addrs().values():
        addrs.update(e.address for e in entries)
    return addrs
