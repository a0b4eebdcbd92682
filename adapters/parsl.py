"""Parsl: every task goes through a DataFlowKernel, so Parsl's executors and
providers (a local HighThroughputExecutor here, Slurm or PBS blocks elsewhere)
stay in charge of placement, while asyncflow keeps the DAG.

Why the adapter looks the way it does:

* Parsl's own dependency tracking is bypassed: the engine only hands over ready
  work, so each spec becomes one ``dfk.submit`` with plain arguments, and the
  ``AppFuture`` done callback (run on Parsl's result thread) feeds the sink.
* User arguments travel packed inside one positional argument, never as Parsl
  keyword arguments: names such as ``inputs``, ``outputs``, ``stdout`` or
  ``walltime`` mean something to Parsl and must not be reinterpreted.
* For out-of-process executors the adapter pickles function, arguments and
  result itself (cloudpickle where plain pickle would pin something to
  ``__main__``), so serialisation errors name the task as on every other
  backend, and Parsl's dill only moves one bytes object per task, which halves
  its per-task cost.
* ``AppFuture.cancel`` raises ``NotImplementedError`` upstream.  Cancelling is
  therefore arranged by the adapter on the same host: a marker file per
  cancelled task (checked by the worker before it starts anything) and a
  datagram to every worker process of this DFK, whose listener thread calls
  :func:`asyncflow.worker.kill_command` for a running executable or kills its
  own process for a running function (HTEX restarts lost workers).  Workers on
  other hosts are out of reach, and the capabilities say so.
* The default configuration is a loopback-only HighThroughputExecutor whose run
  directory lives in a temp dir that shutdown removes, with Parsl logging at
  WARNING: Parsl's defaults (DEBUG, ``./runinfo``) write 100+ MB per benchmark.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import logging
import math
import os
import pickle
import queue
import shlex
import shutil
import signal
import socket
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import CancelledError, Future
from typing import Any

import cloudpickle
import parsl
from parsl.config import Config
from parsl.dataflow.dflow import DataFlowKernel
from parsl.executors import HighThroughputExecutor
from parsl.executors import ThreadPoolExecutor as ParslThreadPoolExecutor
from parsl.executors.base import ParslExecutor
from parsl.executors.errors import BadStateException, InvalidResourceSpecification
from parsl.executors.high_throughput.errors import WorkerLost
from parsl.launchers import SimpleLauncher, SingleNodeLauncher
from parsl.logconfigs.base import LogConfig
from parsl.providers import LocalProvider
from parsl.serialize.errors import DeserializationError
from parsl.serialize.errors import SerializationError as ParslSerializationError

from .._util import run_in_thread
from ..errors import (
    BackendError,
    BackendStartError,
    EngineClosedError,
    ResourceUnavailableError,
    SerializationError,
    TaskDefinitionError,
    WorkerLostError,
)
from ..protocol import BackendInfo, Capabilities, Capability, CompletionSink
from ..spec import DEFAULT_RESOURCES, Resources, TaskSpec
from ..worker import (
    call_function,
    call_pickled,
    dumps_function,
    kill_command,
    run_command,
)

__all__ = ["ParslExecutionBackend", "QuietFileLogging", "local_htex_config"]

log = logging.getLogger("asyncflow.parsl")
C = Capability
_INTERNAL = "_parsl_internal"
_tokens = itertools.count(1)
_NO_GPUS = "no accelerators configured (available_accelerators)"
#: How often a backend checks that the HTEX interchanges it uses still run.
_WATCH_PERIOD = 0.5
#: How long cleaning up may wait for a DFK whose interchange died (Parsl's own
#: cleanup then blocks forever on its command channel).
_BROKEN_CLEANUP = 5.0


class _InterchangeLost(WorkerLostError):
    """An HTEX interchange exited under its executor (set as its bad state)."""


class QuietFileLogging(LogConfig):
    """Parsl logs (``parsl.log``, interchange and worker logs) at ``level``.

    Like Parsl's ``FileLogging``, but its undo also closes the file, so a cleaned
    up DFK leaves no open handle (and no ``ResourceWarning``) behind.
    """

    def __init__(self, level: int = logging.WARNING):
        super().__init__()
        self.level = level

    def initialize_logging(self, *, log_dir: Any, log_name: str) -> Callable[[], None]:
        os.makedirs(log_dir, exist_ok=True)
        handler = logging.FileHandler(os.path.join(log_dir, log_name + ".log"))
        handler.setLevel(self.level)
        handler.setFormatter(
            logging.Formatter(
                "%(asctime)s %(processName)s-%(process)d %(threadName)s %(name)s:"
                "%(lineno)d %(levelname)s: %(message)s"
            )
        )
        logger = logging.getLogger("parsl")
        if logger.level == logging.NOTSET:
            logger.setLevel(self.level)  # keeps Parsl's per-task INFO calls cheap
        logger.addHandler(handler)

        def undo() -> None:
            logger.removeHandler(handler)
            handler.close()

        return undo


def local_htex_config(
    run_dir: str,
    *,
    max_workers: int = 2,
    label: str = "htex",
    log_level: int = logging.WARNING,
    heartbeat_period: int = 2,
    worker_tmpdir: str | None = None,
) -> Config:
    """The configuration ``ParslExecutionBackend()`` loads.

    One block of ``max_workers`` HTEX workers on this machine, every socket on
    127.0.0.1, blocks started on the first strategy tick (0.2 s, not Parsl's
    5 s), no autoscaling, and the workers given this interpreter's ``bin/`` and
    ``sys.path`` so that they import what the driver imports.  ``worker_tmpdir``
    becomes the workers' ``TMPDIR`` (created if missing): the worker pool's
    multiprocessing manager leaves a ``pymp-*`` directory there when its block
    is stopped, so the default backend points it into the temp dir it removes.
    """
    bindir = os.path.dirname(sys.executable)
    paths = [p or os.getcwd() for p in sys.path]
    lines = [
        f'export PATH={shlex.quote(bindir)}:"$PATH"',
        f"export PYTHONPATH={shlex.quote(os.pathsep.join(dict.fromkeys(paths)))}",
    ]
    if worker_tmpdir is not None:
        quoted = shlex.quote(worker_tmpdir)
        lines.append(f"mkdir -p {quoted} && export TMPDIR={quoted}")
    worker_init = "\n".join(lines)
    htex = HighThroughputExecutor(
        label=label,
        address="127.0.0.1",
        loopback_address="127.0.0.1",
        max_workers_per_node=max_workers,
        cores_per_worker=1,
        heartbeat_period=heartbeat_period,
        heartbeat_threshold=max(30, 10 * heartbeat_period),
        interchange_launch_cmd=[sys.executable, os.path.join(bindir, "interchange.py")],
        provider=LocalProvider(
            init_blocks=1, min_blocks=1, max_blocks=1, worker_init=worker_init
        ),
    )
    return Config(
        executors=[htex],
        run_dir=run_dir,
        strategy="none",
        strategy_period=0.2,
        initialize_logging=QuietFileLogging(log_level),
        usage_tracking=0,
    )


# =============================================================================
# Worker side: module-level so Parsl ships them by reference.
# =============================================================================

_W_LOCK = threading.Lock()
_W_STARTING: set[str] = set()  # executables past their marker check, not yet done
_W_FUNCTION: list[str | None] = [None]  # the function this process runs right now
_W_LISTENING: set[str] = set()  # control dirs this process listens for
_INPROC_CANCELLED: set[str] = set()  # markers for executors in the driver process
_INPROC = ""  # control "dir" meaning: the task runs in the driver process


class _Cancelled(Exception):
    """A cancelled task reached a worker; it never reaches the user."""


def _marker(ctl: str, key: str) -> str:
    return os.path.join(ctl, "cancelled", key)  # keys are ours: "af<pid>x<n>.<n>"


def _address(ctl: str, pid: int) -> bytes:
    digest = hashlib.sha1(ctl.encode()).hexdigest()[:16]
    return f"\0asyncflow-parsl-{digest}-{pid}".encode()


def _is_cancelled(ctl: str | None, key: str) -> bool:
    if ctl is None:
        return False
    if ctl == _INPROC:
        return key in _INPROC_CANCELLED
    return os.path.exists(_marker(ctl, key))


def _listen(ctl: str | None) -> None:
    """Start this worker process's cancel listener for ``ctl`` (once)."""
    if not ctl or ctl in _W_LISTENING:
        return
    with _W_LOCK:
        if ctl in _W_LISTENING:
            return
        _W_LISTENING.add(ctl)  # one attempt per process, even if it fails
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            sock.bind(_address(ctl, os.getpid()))
            # Registered only once bound: the driver never misses a listener.
            with open(os.path.join(ctl, "workers", str(os.getpid())), "w"):
                pass
        except OSError:
            logging.getLogger("asyncflow.parsl").warning(
                "cannot listen for cancellations in %s", ctl, exc_info=True
            )
            return
        threading.Thread(
            target=_serve, args=(sock,), daemon=True, name="asyncflow-parsl-cancel"
        ).start()


def _serve(sock: socket.socket) -> None:
    # Abstract socket names are open to every local user: the kernel-attested
    # sender credentials decide whether a message is obeyed.
    creds = socket.CMSG_SPACE(struct.calcsize("3i"))
    me = os.getuid()
    while True:
        data, ancdata, _, _ = sock.recvmsg(1 << 16, creds)
        for level, kind, cdata in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                _, uid, _ = struct.unpack("3i", cdata[: struct.calcsize("3i")])
                if uid == me:
                    _kill_here(data.decode().split("\n"))


def _kill_here(keys: Iterable[str], functions: bool = True) -> None:
    late = []
    with _W_LOCK:
        for key in keys:
            if key in _W_STARTING:
                # Kills now, or as soon as Popen returns; False only in the
                # instant before run_command registers the command.
                if not kill_command(key):
                    late.append(key)
            elif functions and key and _W_FUNCTION[0] == key:
                if _feeders_idle():
                    _die()
                late.append(key)
    if late:
        threading.Thread(
            target=_kill_soon, args=(late,), daemon=True, name="asyncflow-parsl-kill"
        ).start()


def _kill_soon(keys: list[str]) -> None:
    deadline = time.monotonic() + 10
    while keys and time.monotonic() < deadline:
        time.sleep(0.001)
        with _W_LOCK:
            left = []
            for key in keys:
                if key in _W_STARTING:
                    if not kill_command(key):
                        left.append(key)
                elif _W_FUNCTION[0] == key:
                    if _feeders_idle():
                        _die()
                    left.append(key)
            keys = left


def _die() -> None:
    """Only a process can stop Python code: this worker dies, and the HTEX
    manager reports the task lost and starts a fresh worker."""
    os.kill(os.getpid(), signal.SIGKILL)


def _feeders_idle() -> bool:
    """No multiprocessing queue of this process is half-way through a write.

    The worker's previous result may still be in flight to the manager: its
    queue's feeder thread holds a cross-process lock while it writes, and dying
    then would wedge every worker of the pool.  Idle means each feeder waits on
    its condition with an empty buffer; with the main thread in user code,
    nothing can wake it.
    """
    frames = sys._current_frames()
    for thread in threading.enumerate():
        if thread.name != "QueueFeederThread":
            continue
        frame = frames.get(thread.ident)  # type: ignore[arg-type]
        if frame is None:
            continue
        code = frame.f_code
        if code.co_name != "wait" or not code.co_filename.endswith("threading.py"):
            return False
        while frame is not None and frame.f_code.co_name != "_feed":
            frame = frame.f_back
        buffer = frame.f_locals.get("buffer") if frame is not None else None
        if buffer is None or len(buffer):
            return False
    return True


def _run_command(
    command: Any,
    key: str,
    name: str,
    ctl: str | None,
    parsl_resource_specification: Any = None,
) -> str:
    _listen(ctl)
    with _W_LOCK:
        _W_STARTING.add(key)
    try:
        if _is_cancelled(ctl, key):
            raise _Cancelled(key)
        return run_command(command, key, name)
    finally:
        with _W_LOCK:
            _W_STARTING.discard(key)


def _run_inproc(
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    is_async: bool,
    name: str,
    key: str,
    parsl_resource_specification: Any = None,
) -> Any:
    if key in _INPROC_CANCELLED:
        raise _Cancelled(key)
    return call_function(fn, args, kwargs, is_async, name)


_PLAIN = frozenset({type(None), bool, int, float, str})


def _run_packed(packed: bytes, parsl_resource_specification: Any = None) -> Any:
    """Run a function task out of process; in and out travel as one bytes object.

    Parsl serialises arguments with dill, object by object; one pickled blob
    halves its per-task cost and leaves the choice of pickler to asyncflow.
    """
    blob, args, kwargs, is_async, name, key, ctl = pickle.loads(packed)
    _listen(ctl)
    with _W_LOCK:
        if _is_cancelled(ctl, key):
            raise _Cancelled(key)
        _W_FUNCTION[0] = key
    try:
        result = call_pickled(blob, args, kwargs, is_async, name)
    except BaseException as exc:
        raise _portable(exc, name)  # noqa: B904 - keeps the cause chain
    finally:
        with _W_LOCK:
            _W_FUNCTION[0] = None
    if type(result) in _PLAIN:
        return result  # Parsl ships these faster than the bytes of their pickle
    try:
        return pickle.dumps(result, protocol=5)
    except Exception:
        pass
    try:
        return cloudpickle.dumps(result, protocol=5)
    except Exception as exc:
        raise SerializationError(
            f"task {name!r}: its result of type {type(result).__name__} cannot be "
            f"pickled ({type(exc).__name__}: {exc}); return plain data"
        ) from None


def _portable(exc: BaseException, name: str) -> BaseException:
    """``exc`` made fit for the trip back through Parsl.

    The worker traceback already travels as a note (see ``call_function``), so
    the traceback objects are dropped: Parsl pickles them frame by frame, and a
    RecursionError's thousand frames kill the worker.  An exception that cannot
    be pickled at all is replaced by a SerializationError that says what it was.
    """
    cause: BaseException | None = exc
    while cause is not None:
        cause.__traceback__ = None
        cause = cause.__cause__
    try:
        cloudpickle.dumps(exc)
    except Exception as err:
        new = SerializationError(
            f"task {name!r} raised {type(exc).__name__}({exc}), which cannot be "
            f"pickled back to the driver ({type(err).__name__}: {err})"
        )
        for note in getattr(exc, "__notes__", ()):
            new.add_note(note)
        return new
    return exc


# =============================================================================
# Driver side
# =============================================================================


class _Profile:
    """What asyncflow knows about one Parsl executor."""

    __slots__ = (
        "cores",
        "gpus",
        "htex",
        "in_process",
        "kind",
        "label",
        "local",
        "memory",
        "mpi",
        "slots",
    )

    def __init__(self, ex: ParslExecutor):
        self.label: str = ex.label
        self.kind = type(ex).__name__
        self.in_process = isinstance(ex, ParslThreadPoolExecutor)
        self.htex = isinstance(ex, HighThroughputExecutor)
        self.mpi = bool(getattr(ex, "enable_mpi_mode", False))
        self.memory: float | None = None  # MB per task slot, None: unknown
        self.gpus = 0
        if isinstance(ex, ParslThreadPoolExecutor):
            self.slots = int(ex.max_threads or 1)
            self.cores: float | None = float(self.slots)
            self.local = True
        elif isinstance(ex, HighThroughputExecutor):
            provider = ex.provider
            launcher = getattr(provider, "launcher", None)
            self.local = (
                isinstance(provider, LocalProvider)
                and isinstance(launcher, SingleNodeLauncher | SimpleLauncher)
                and sys.platform.startswith("linux")
            )
            per_node = ex.workers_per_node
            blocks = max(getattr(provider, "max_blocks", 1), 1)
            nodes = max(getattr(provider, "nodes_per_block", 1), 1)
            finite = math.isfinite(per_node)
            self.slots = int(per_node * blocks * nodes) if finite else 2
            self.cores = float(ex.cores_per_worker)
            if ex.mem_per_worker:
                self.memory = ex.mem_per_worker * 1024
            elif self.local:
                self.memory = _physical_memory_mb()
            self.gpus = 1 if ex.available_accelerators else 0
        elif self.kind in ("WorkQueueExecutor", "TaskVineExecutor"):
            self.local = False
            self.slots = 2
            self.cores = None
            self.gpus = -1  # scheduled by the manager
        else:
            self.local = False
            self.slots = 2
            self.cores = None

    @property
    def translates(self) -> bool:
        return self.kind in ("WorkQueueExecutor", "TaskVineExecutor")

    def checks(self) -> bool:
        return self.in_process or self.htex or self.translates

    def resource_spec(self, res: Resources, name: str) -> dict[str, Any]:
        """Parsl's ``parsl_resource_specification`` for ``res``, or raise."""
        if self.translates:
            if res.ranks > 1:
                self._refuse(res, name, "no MPI launch")
            out: dict[str, Any] = {"cores": res.cores}
            if res.memory is not None:
                out["memory"] = res.memory
            if res.gpus:
                out["gpus"] = res.gpus
            return out
        if self.mpi:
            if res.gpus or res.memory is not None or res.cores > 1:
                self._refuse(res, name, "MPI ranks only (ask for ranks=N)")
            return {"num_nodes": 1, "num_ranks": res.ranks, "ranks_per_node": res.ranks}
        if not self.checks():
            self._refuse(res, name, "no per-task resources asyncflow can express")
        if res.ranks > 1:
            self._refuse(res, name, "no MPI launch (use Parsl's MPIExecutor)")
        if self.cores is not None and res.cores > self.cores:
            self._refuse(
                res,
                name,
                f"{self.cores:g} core(s) per worker"
                + ("" if self.in_process else "; raise cores_per_worker"),
            )
        if res.gpus > self.gpus:
            self._refuse(
                res,
                name,
                f"{self.gpus} accelerator(s) per worker (available_accelerators)",
            )
        memory = self.memory
        if res.memory is not None and memory is not None and res.memory > memory:
            self._refuse(res, name, f"{self.memory:.0f} MB per worker")
        return {}

    def _refuse(self, res: Resources, name: str, why: str) -> None:
        raise ResourceUnavailableError(
            f"task {name!r} asks for {res}, but Parsl executor {self.label!r} "
            f"({self.kind}) offers {why}; lower the request or route the task to "
            "another executor with options={'executor': ...}"
        )


def _physical_memory_mb() -> float | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20
    except (ValueError, OSError, AttributeError):
        return None


class _Control:
    """Delivers cancellations to worker processes on this host.

    Marker files tell a task that has not started to skip itself; a datagram to
    every registered worker process kills what already runs.  A single thread
    does the file and socket work so that ``cancel()`` never blocks the loop.
    """

    def __init__(self, ctl: str):
        self.ctl = ctl
        os.makedirs(os.path.join(ctl, "cancelled"), exist_ok=True)
        os.makedirs(os.path.join(ctl, "workers"), exist_ok=True)
        self._queue: queue.SimpleQueue[tuple[str, list[str], list[str]] | None] = (
            queue.SimpleQueue()
        )
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False

    def cancel(self, mark: list[str], kill: list[str]) -> None:
        self._post(("cancel", mark, kill))

    def forget(self, keys: list[str]) -> None:
        self._post(("forget", keys, []))

    def _post(self, item: tuple[str, list[str], list[str]]) -> None:
        if self._closed:
            return
        self._queue.put(item)
        if self._thread is None:
            with self._lock:
                if self._thread is None and not self._closed:
                    self._thread = threading.Thread(
                        target=self._run, name="asyncflow-parsl-control", daemon=True
                    )
                    self._thread.start()

    def _run(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.settimeout(5)  # a stopped worker must not hold up the others
        try:
            while True:
                item = self._queue.get()
                if item is None:
                    return
                what, keys, kill = item
                try:
                    if what == "cancel":
                        for key in keys:
                            with open(_marker(self.ctl, key), "w"):
                                pass
                        if kill:
                            self._broadcast(sock, kill)
                    else:
                        for key in keys:
                            with contextlib.suppress(OSError):
                                os.unlink(_marker(self.ctl, key))
                except OSError:
                    log.warning("cancelling %s failed", keys, exc_info=True)
        finally:
            sock.close()

    def _broadcast(self, sock: socket.socket, keys: list[str]) -> None:
        chunks: list[list[str]] = []
        chunk: list[str] = []
        size = 0
        for key in keys:
            if size + len(key) > 30_000 and chunk:
                chunks.append(chunk)
                chunk, size = [], 0
            chunk.append(key)
            size += len(key) + 1
        chunks.append(chunk)
        wdir = os.path.join(self.ctl, "workers")
        for entry in os.listdir(wdir):
            try:
                address = _address(self.ctl, int(entry))
            except ValueError:
                continue
            for part in chunks:
                try:
                    sock.sendto("\n".join(part).encode(), address)
                except (ConnectionRefusedError, FileNotFoundError):
                    with contextlib.suppress(OSError):  # that worker is gone
                        os.unlink(os.path.join(wdir, entry))
                    break
                except OSError:
                    log.warning("cannot reach Parsl worker %s", entry, exc_info=True)
                    break

    def close(self) -> None:
        """Deliver everything queued, then stop (blocking)."""
        with self._lock:
            self._closed = True
            thread = self._thread
        if thread is not None:
            self._queue.put(None)
            thread.join()


class _Runtime:
    """One DataFlowKernel, shared by the backends built on it.

    ``owned``: the DFK was loaded here and is cleaned up when the last backend
    using it shuts down; otherwise it belongs to the caller and stays up.
    """

    def __init__(
        self,
        config: Config | None,
        dfk: DataFlowKernel | None,
        tmpdir: str | None,
        wait_for_workers: float | None,
    ):
        self.fix_path = tmpdir is None  # the default config brings its own PATH
        self.config = config
        self.dfk = dfk
        self.owned = dfk is None
        self.tmpdir = tmpdir
        self.wait_for_workers = wait_for_workers
        self.users = 0
        self.closed = False
        self._lock = threading.Lock()
        self.control: _Control | None = None

    @property
    def executors(self) -> Sequence[ParslExecutor]:
        if self.dfk is not None:
            return [e for lbl, e in self.dfk.executors.items() if lbl != _INTERNAL]
        assert self.config is not None
        return list(self.config.executors)

    def acquire(self) -> None:
        """Load the DFK if needed (blocking; run from a thread)."""
        with self._lock:
            if self.closed:
                raise EngineClosedError("this Parsl DataFlowKernel was cleaned up")
            self.users += 1
            if self.dfk is None:
                try:
                    self._load()
                except BaseException:
                    self.users -= 1
                    self.closed = True  # a Config cannot be loaded twice
                    self._remove_tmpdir()
                    raise
            assert self.dfk is not None
            profiles = [_Profile(e) for e in self.executors]
            if self.control is None and any(
                p.local and not p.in_process for p in profiles
            ):
                self.control = _Control(os.path.join(self.dfk.run_dir, "asyncflow-ctl"))

    def _load(self) -> None:
        assert self.config is not None
        if self.fix_path:
            _fix_path(self.config.executors)
        try:
            dfk = DataFlowKernel(self.config)
        except Exception as exc:
            raise BackendStartError(
                f"Parsl could not load its configuration ({type(exc).__name__}: "
                f"{exc}); "
                "a Config can be loaded only once, and HTEX needs "
                "process_worker_pool.py and interchange.py on PATH"
            ) from exc
        self.dfk = dfk
        if self.wait_for_workers:
            try:
                self._await_workers(self.wait_for_workers)
            except BaseException:
                self._cleanup()
                raise

    def _await_workers(self, timeout: float) -> None:
        assert self.dfk is not None
        deadline = time.monotonic() + timeout
        for ex in self.executors:
            if not isinstance(ex, HighThroughputExecutor):
                continue
            while True:
                if ex.bad_state_is_set:
                    raise BackendStartError(
                        f"Parsl executor {ex.label!r} failed to start its workers: "
                        f"{ex.executor_exception}; see {ex.logdir}"
                    )
                if sum(m["worker_count"] for m in ex.connected_managers()) > 0:
                    break
                if time.monotonic() > deadline:
                    raise BackendStartError(
                        f"no HTEX worker of executor {ex.label!r} connected within "
                        f"{timeout:g}s; check that process_worker_pool.py runs here "
                        f"(submit scripts and logs under {self.dfk.run_dir})"
                    )
                time.sleep(0.05)

    def release(self) -> None:
        with self._lock:
            self.users -= 1
            if self.users > 0 or self.closed:
                return
            if self.control is not None:
                self.control.close()
            if not self.owned:
                self.control = None  # a later backend on this DFK opens a new one
                return
            self.closed = True
            self._cleanup()

    def _cleanup(self) -> None:
        dfk = self.dfk
        if dfk is None:
            self._remove_tmpdir()
            return
        groups = _local_block_groups(dfk)
        broken = bool(_dead_interchanges(dfk))
        try:
            if not dfk.cleanup_called:
                if broken:
                    _bounded_cleanup(dfk)
                else:
                    dfk.cleanup()
            if parsl.DataFlowKernelLoader._dfk is dfk:
                parsl.clear()
        finally:
            # Without an interchange the blocks' managers would wait out their
            # heartbeat threshold: stop them now.
            _reap(groups, grace=0.0 if broken else 5.0)
            self._remove_tmpdir()

    def _remove_tmpdir(self) -> None:
        if self.tmpdir is not None:
            shutil.rmtree(self.tmpdir, ignore_errors=True)


def _dead_interchanges(
    dfk: DataFlowKernel,
) -> list[tuple[HighThroughputExecutor, int]]:
    """The HTEX executors of ``dfk`` whose interchange process has exited, with
    its exit code (the interchange is always a child of this process)."""
    dead = []
    for ex in dfk.executors.values():
        if not isinstance(ex, HighThroughputExecutor):
            continue
        proc = getattr(ex, "interchange_proc", None)
        poll = getattr(proc, "poll", None)
        if poll is None:
            continue
        with contextlib.suppress(Exception):
            code = poll()
            if code is not None:
                dead.append((ex, code))
    return dead


def _bounded_cleanup(dfk: DataFlowKernel) -> None:
    """``dfk.cleanup()``, given up on after ``_BROKEN_CLEANUP`` seconds.

    With its interchange gone, Parsl's job status poller blocks forever on the
    command channel, and ``cleanup()`` joins it.  The abandoned threads are
    daemons blocked on sockets; the worker blocks are reaped by the caller.
    """
    thread = threading.Thread(
        target=dfk.cleanup, name="asyncflow-parsl-cleanup", daemon=True
    )
    thread.start()
    thread.join(_BROKEN_CLEANUP)
    if thread.is_alive():
        log.warning(
            "Parsl's cleanup did not finish within %.0f s because an HTEX "
            "interchange died; its threads are abandoned",
            _BROKEN_CLEANUP,
        )


def _fix_path(executors: Iterable[ParslExecutor]) -> None:
    """HTEX finds its programs on PATH; a venv used without activation lacks them."""
    if not any(isinstance(e, HighThroughputExecutor) for e in executors):
        return
    if shutil.which("process_worker_pool.py") is not None:
        return
    bindir = os.path.dirname(sys.executable)
    if os.path.exists(os.path.join(bindir, "process_worker_pool.py")):
        os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")


def _local_block_groups(dfk: DataFlowKernel) -> list[int]:
    groups = []
    for ex in dfk.executors.values():
        provider = getattr(ex, "provider", None)
        if not isinstance(provider, LocalProvider):
            continue
        for job in provider.resources.values():
            with contextlib.suppress(OSError, KeyError, TypeError):
                groups.append(os.getpgid(job["remote_pid"]))
    return [g for g in groups if g != os.getpgrp()]


def _reap(groups: list[int], grace: float = 5.0) -> None:
    """Wait for the worker blocks' process groups to empty; SIGKILL leftovers."""
    deadline = time.monotonic() + grace
    for pgid in groups:
        while True:
            try:
                os.killpg(pgid, 0)
            except (ProcessLookupError, PermissionError):
                break
            if time.monotonic() > deadline:
                with contextlib.suppress(OSError):
                    os.killpg(pgid, signal.SIGKILL)
                break
            time.sleep(0.05)


class _Task:
    __slots__ = ("command", "key", "label", "name", "packed")

    def __init__(self, name: str, key: str, command: bool, label: str, packed: bool):
        self.name = name
        self.key = key
        self.command = command
        self.label = label
        self.packed = packed  # the result comes back pickled (see _run_packed)


#: What ``ParslExecutionBackend()`` (the local HTEX) declares; other configs vary.
DEFAULT_CAPABILITIES = Capabilities.of(
    C.CANCEL_RUNNING,
    C.EXECUTABLES,
    C.FUNCTIONS,
    C.KILL_EXECUTABLES,
    C.LARGE_PAYLOADS,
    C.PARALLEL,
    C.RESOURCES,
    C.SERIALIZES,
    gpus=_NO_GPUS,
)


class ParslExecutionBackend:
    """Runs tasks through a Parsl DataFlowKernel.

    * ``ParslExecutionBackend()``: a local HighThroughputExecutor with
      ``max_workers`` workers on 127.0.0.1 and a temporary run directory, all
      removed at shutdown.
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
        config: Config | DataFlowKernel | None = None,
        *,
        executor: str | None = None,
        max_workers: int = 2,
        kill_running_functions: bool = True,
        wait_for_workers: float | None = None,
        _runtime: _Runtime | None = None,
    ):
        if _runtime is not None:
            runtime = _runtime
        elif config is None:
            tmpdir = tempfile.mkdtemp(prefix="asyncflow-parsl-")
            worker_tmp = os.path.join(tmpdir, "tmp")
            try:
                cfg = local_htex_config(
                    os.path.join(tmpdir, "runinfo"),
                    max_workers=max_workers,
                    # unix socket paths below it must stay under 108 bytes
                    worker_tmpdir=worker_tmp if len(worker_tmp) <= 60 else None,
                )
            except BaseException:
                shutil.rmtree(tmpdir, ignore_errors=True)
                raise
            runtime = _Runtime(
                cfg,
                None,
                tmpdir,
                60.0 if wait_for_workers is None else wait_for_workers,
            )
        elif isinstance(config, DataFlowKernel):
            if config.cleanup_called:
                raise TaskDefinitionError("this Parsl DataFlowKernel was cleaned up")
            runtime = _Runtime(None, config, None, None)
        elif isinstance(config, Config):
            runtime = _Runtime(config, None, None, wait_for_workers)
        else:
            raise TaskDefinitionError(
                "ParslExecutionBackend takes a parsl.config.Config, a loaded "
                f"DataFlowKernel or nothing, got {type(config).__name__}"
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
        cls, config: Config | DataFlowKernel, **kwargs: Any
    ) -> dict[str, ParslExecutionBackend]:
        """One backend per executor label, sharing one DFK (cleaned up, if it was
        loaded here, when the last of them shuts down)."""
        if isinstance(config, DataFlowKernel):
            runtime = _Runtime(None, config, None, None)
        else:
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
        absent: dict[str, str] = {}
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
            caps.add(C.KILL_EXECUTABLES)
        else:
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
                runtime._remove_tmpdir()  # never started: only the temp dir exists
            return
        try:
            await asyncio.shield(job)
        except BaseException:
            return  # the DFK never came up; acquire() cleaned up after itself
        self.cancel(list(self._tasks))
        self._pickled.clear()
        await run_in_thread(self._runtime.release, name="asyncflow-parsl-shutdown")

    # -- submission --------------------------------------------------------------
    def submit(self, specs: Sequence[TaskSpec]) -> None:
        sink = self._sink
        dfk = self._dfk
        assert sink is not None and dfk is not None
        if self._closed or dfk.cleanup_called:
            for spec in specs:
                sink.set_exception(
                    spec.uid,
                    EngineClosedError(
                        f"task {spec.name!r}: the Parsl DataFlowKernel is shut down"
                    ),
                )
            return
        control = self._runtime.control
        ctl = control.ctl if control is not None else None
        tasks = self._tasks
        token = self._token
        counter = self._counter
        dsubmit = dfk.submit
        done = self._done
        default = self._label
        profiles = self._profiles
        for spec in specs:
            uid = spec.uid
            options = spec.options
            label = default
            if options and self._routable and "executor" in options:
                label = options["executor"]
            try:
                profile = profiles[label]
            except (KeyError, TypeError):
                sink.set_exception(
                    uid,
                    TaskDefinitionError(
                        f"task {spec.name!r}: options['executor']={label!r} is not "
                        "an executor of this Parsl configuration; it has "
                        f"{sorted(profiles)}"
                    ),
                )
                continue
            if (
                spec.resources is DEFAULT_RESOURCES
                and not profile.mpi
                and not (options and "parsl_resource_specification" in options)
            ):
                app_kwargs: dict[str, Any] = {}
            else:
                try:
                    app_kwargs = self._app_kwargs(spec, profile)
                except (ResourceUnavailableError, TaskDefinitionError) as exc:
                    sink.set_exception(uid, exc)
                    continue
            key = f"{token}.{next(counter)}"
            try:
                packed = False
                if spec.command is not None:
                    fn: Callable[..., Any] = _run_command
                    args: tuple[Any, ...] = (
                        spec.command,
                        key,
                        spec.name,
                        _INPROC
                        if profile.in_process
                        else ctl
                        if profile.local
                        else None,
                    )
                elif profile.in_process:
                    fn = _run_inproc
                    args = (
                        spec.function,
                        spec.args,
                        spec.kwargs,
                        spec.is_async,
                        spec.name,
                        key,
                    )
                else:
                    fn = _run_packed
                    args = (self._pack(spec, key, ctl if profile.local else None),)
                    packed = True
                fut = dsubmit(fn, args, [label], False, None, app_kwargs)
            except SerializationError as exc:
                sink.set_exception(uid, exc)
                continue
            except Exception as exc:
                sink.set_exception(
                    uid,
                    BackendError(
                        f"task {spec.name!r}: Parsl refused it ({type(exc).__name__}: "
                        f"{exc})"
                    ),
                )
                continue
            fut._asyncflow_uid = uid  # type: ignore[attr-defined]
            tasks[uid] = _Task(spec.name, key, spec.command is not None, label, packed)
            fut.add_done_callback(done)

    def _app_kwargs(self, spec: TaskSpec, profile: _Profile) -> dict[str, Any]:
        res = spec.resources
        opts = spec.options
        extra = opts.get("parsl_resource_specification") if opts else None
        if res.is_default and not extra and not profile.mpi:
            return {}
        rspec = profile.resource_spec(res, spec.name)
        if extra:
            if not isinstance(extra, Mapping):
                raise TaskDefinitionError(
                    f"task {spec.name!r}: options['parsl_resource_specification'] "
                    f"must be a dict, got {type(extra).__name__}"
                )
            rspec = {**rspec, **extra}
        if rspec and profile.in_process:
            raise ResourceUnavailableError(
                f"task {spec.name!r}: Parsl's ThreadPoolExecutor "
                f"({profile.label!r}) takes no parsl_resource_specification "
                f"({sorted(rspec)})"
            )
        return {"parsl_resource_specification": rspec} if rspec else {}

    def _pickle(self, spec: TaskSpec) -> bytes:
        fn = spec.function
        try:
            return self._pickled[fn]
        except KeyError:
            pass
        except TypeError:  # unhashable callable
            return self._dumps(spec)
        blob = self._pickled[fn] = self._dumps(spec)
        return blob

    @staticmethod
    def _dumps(spec: TaskSpec) -> bytes:
        try:
            assert spec.function is not None
            return dumps_function(spec.function)
        except Exception as exc:
            raise SerializationError(
                f"task {spec.name!r}: its function cannot be serialised for Parsl "
                f"workers ({type(exc).__name__}: {exc}); define it at module level "
                "and do not capture locks, sockets or open files"
            ) from exc

    def _pack(self, spec: TaskSpec, key: str, ctl: str | None) -> bytes:
        blob = self._pickle(spec)
        item = (blob, spec.args, spec.kwargs, spec.is_async, spec.name, key, ctl)
        try:
            # The C pickler first: cloudpickle costs more per call than a no-op
            # task's whole payload.  Anything it would pin to the driver's
            # __main__ by name goes through cloudpickle, which ships it by value.
            data = pickle.dumps(item, protocol=5)
            if b"__main__" not in data or (
                data.count(b"__main__") == blob.count(b"__main__")
            ):
                return data
        except Exception:
            pass
        try:
            return cloudpickle.dumps(item, protocol=5)
        except Exception as exc:
            raise SerializationError(
                f"task {spec.name!r}: an argument cannot be serialised for Parsl "
                f"workers ({type(exc).__name__}: {exc}); pass plain data"
            ) from exc

    # -- completion (Parsl's result or launch thread) ---------------------------
    def _done(self, fut: Future[Any]) -> None:
        uid: str = fut._asyncflow_uid  # type: ignore[attr-defined]
        task = self._tasks.pop(uid, None)
        if task is None:
            self._forget(uid)  # cancelled: the engine already resolved it
            return
        sink = self._sink
        assert sink is not None
        try:
            exc = fut.exception()
        except CancelledError:
            return
        if exc is None:
            value = fut.result()
            if type(value) is bytes and task.packed:
                try:
                    value = pickle.loads(value)
                except Exception as err:
                    sink.set_exception(
                        uid,
                        SerializationError(
                            f"task {task.name!r}: its result cannot be unpickled in "
                            f"the driver ({type(err).__name__}: {err})"
                        ),
                    )
                    return
            sink.set_result(uid, value)
            return
        sink.set_exception(uid, self._translate(exc, task))

    @staticmethod
    def _translate(exc: BaseException, task: _Task) -> BaseException:
        if isinstance(exc, WorkerLost):
            return WorkerLostError(
                f"task {task.name!r}: the Parsl worker running it died ({exc})"
            )
        if isinstance(exc, InvalidResourceSpecification):
            return ResourceUnavailableError(
                f"task {task.name!r}: Parsl executor {task.label!r} rejected its "
                f"resource specification ({exc})"
            )
        if isinstance(exc, ParslSerializationError | DeserializationError):
            return SerializationError(f"task {task.name!r}: {exc}")
        if isinstance(exc, BadStateException):
            # Parsl keeps only the text of the bad state's exception here.
            cause = getattr(getattr(exc, "executor", None), "executor_exception", None)
            if isinstance(cause, _InterchangeLost):
                exc = cause
            else:
                return WorkerLostError(
                    f"task {task.name!r}: Parsl executor {task.label!r} failed ({exc})"
                )
        if isinstance(exc, _InterchangeLost):  # raised by submit once marked bad
            return WorkerLostError(f"task {task.name!r}: {exc}")
        return exc

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
