"""The Ray runtime's processes: starting, stopping, finding and killing them.

Ray ties the processes ``ray.init`` starts to the thread that started them, so
a thread of ours calls ``ray.init`` and, at shutdown, ``ray.shutdown``.  A
local Ray is kept on loopback, given a private temp dir and auth token, and its
processes are marked so that every one of them (crashed raylets' orphans
included) is found and killed at shutdown.  Cancelled executables are killed
by the marker in their environment, on every node.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import secrets
import shutil
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

from ..._util import run_in_thread
from ...errors import BackendStartError
from .base import _RayBase, log
from .errors import _token_refused
from .worker import _sweep

#: Set in the environment of every process of a Ray this adapter starts.
_NODE_MARKER = "ASYNCFLOW_RAY_NODE"
_INIT_LOCK = threading.Lock()
_LOOPBACK = frozenset({"127.0.0.1", "::1", "::ffff:127.0.0.1"})


class _ProcessMixin(_RayBase):
    """The owner thread, and the processes of the Ray it brings up."""

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
                    _check_attach(self._address)
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

    def _shutdown_blocking(self) -> None:
        prefix = f"{self._token}/"
        if not self._owns:
            if ray.is_initialized() and self._lost is None:  # else it waits on GCS
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


def _ignore(_: Any) -> None:
    pass


def _client_refuses_token(target: str) -> bool:
    """Whether the Ray Client server at ``target`` refuses this driver's token
    (or its lack of one): a PING, which Ray's proxy answers itself, through the
    channel Ray Client would use.  Anything but a refusal is left to Ray."""
    try:  # Ray's internals: without them, Ray's own wait and words
        import grpc
        from ray._private.grpc_utils import init_grpc_channel
        from ray.core.generated import ray_client_pb2, ray_client_pb2_grpc
    except ImportError:
        return False
    ping = ray_client_pb2.ClusterInfoRequest(  # type: ignore[attr-defined]
        type=ray_client_pb2.ClusterInfoType.PING  # type: ignore[attr-defined]
    )
    try:
        channel = init_grpc_channel(target, asynchronous=False)
        try:
            ray_client_pb2_grpc.RayletDriverStub(channel).ClusterInfo(ping, timeout=5)
        finally:
            channel.close()
    except grpc.RpcError as exc:
        return exc.code() == grpc.StatusCode.UNAUTHENTICATED
    except Exception:
        log.debug("probing the Ray Client server at %s failed", target, exc_info=True)
    return False


def _auth_mode_is_token() -> bool:
    return os.environ.get("RAY_AUTH_MODE", "").lower() == "token"


def _check_attach(address: str) -> None:
    """Fail at once, saying what to do, where ``ray.init(address=...)`` would
    fail only after a long wait with a bare ConnectionError.

    * A cluster with token authentication on (any Ray 2.60 head not on loopback)
      refuses a driver without its token, or with another: Ray retries for 20 s
      (``HOST:PORT``) or 30 s (``ray://``, whose timeout never names the token).
      One request tells, in milliseconds.
    * ``HOST:PORT`` attaches through a raylet on this host (Ray finds it with
      ``ps``); on a host where no Ray node runs, such as a Slurm login node, Ray
      looks for one for 60 s.  Ray Client (``ray://``) needs no local raylet.

    Only when the address answers on TCP: an address nobody listens on is left to
    ``ray.init`` and its own wait, as before; so is ``auto``.
    """
    if address == "auto":
        return
    scheme, _, rest = address.rpartition("://")
    host, sep, port = rest.partition("/")[0].rpartition(":")
    if not sep:
        host, port = rest.partition("/")[0], "10001" if scheme == "ray" else ""
    if not port.isdigit() or scheme not in ("", "ray"):
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=2).close()
    except OSError:
        return
    if scheme == "ray":
        if _client_refuses_token(f"{host}:{port}"):
            raise BackendStartError(
                f"Ray could not be attached: "
                f"{_token_refused(address, _auth_mode_is_token())}"
            )
        return
    try:  # Ray's internals: without them, Ray's own wait and words
        from ray._raylet import GcsClient  # type: ignore[attr-defined]
        from ray.exceptions import AuthenticationError
    except ImportError:
        return
    try:
        GcsClient(address=address)
    except AuthenticationError:
        raise BackendStartError(
            f"Ray could not be attached: "
            f"{_token_refused(address, _auth_mode_is_token())}"
        ) from None
    except Exception:  # anything else: ray.init reports it in its own words
        log.debug("probing the GCS at %s failed", address, exc_info=True)
        return
    find_node_ids = getattr(ray._private.services, "find_node_ids", None)
    if find_node_ids is not None and not find_node_ids():
        raise BackendStartError(
            f"Ray could not be attached: address={address!r} attaches through a "
            "Ray node on this host, and none runs here (a Slurm login node has "
            "none): run the driver on a node of the Ray cluster (for a cluster in "
            "a Slurm job: srun --overlap --jobid=JOB -w HEAD_NODE python ...), or "
            f"attach through Ray Client: address='ray://{host}:10001'"
        )


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
