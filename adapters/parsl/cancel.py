"""Cancelling on this host, both ends: ``AppFuture.cancel`` raises
``NotImplementedError`` upstream, so the adapter arranges it itself.

The driver's :class:`Control` writes a marker file per cancelled task (checked
by the worker before it starts anything) and sends a datagram to every worker
process of this DFK.  In each worker process a listener thread, started by the
first task it runs (see ``worker``), calls :func:`asyncflow.commands.kill_command`
for a running executable or kills its own process for a running function (HTEX
restarts lost workers).  Workers on other hosts are out of reach, and the
capabilities say so.  Executors in the driver process (Parsl's
ThreadPoolExecutor) use an in-process set of markers instead.  A backend's
:class:`Canceller` decides, per task, which of the two ways applies.

The worker end keeps its per-process state (the function running now, the
commands starting, the directories listened for) at module level; workers
import it by this path, ``asyncflow.adapters.parsl.cancel``, through ``worker``.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import queue
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from types import FrameType
from typing import TYPE_CHECKING

from ...commands import kill_command

if TYPE_CHECKING:
    from .state import State

log = logging.getLogger("asyncflow.parsl")

# -- worker end ---------------------------------------------------------------

_W_LOCK = threading.Lock()
_W_STARTING: set[str] = set()  # executables past their marker check, not yet done
_W_FUNCTION: list[str | None] = [None]  # the function this process runs right now
_W_LISTENING: set[str] = set()  # control dirs this process listens for
_INPROC_CANCELLED: set[str] = set()  # markers for executors in the driver process
INPROC = ""  # control "dir" meaning: the task runs in the driver process


class Cancelled(Exception):
    """A cancelled task reached a worker; it never reaches the user."""


@contextlib.contextmanager
def command_slot(ctl: str | None, key: str) -> Iterator[None]:
    """Run an executable's task unless it was cancelled; while it starts and
    runs, a cancellation kills its command."""
    listen(ctl)
    with _W_LOCK:
        _W_STARTING.add(key)
    try:
        if is_cancelled(ctl, key):
            raise Cancelled(key)
        yield
    finally:
        with _W_LOCK:
            _W_STARTING.discard(key)


@contextlib.contextmanager
def function_slot(ctl: str | None, key: str) -> Iterator[None]:
    """Run a function task unless it was cancelled; while it runs, a
    cancellation kills this worker process."""
    listen(ctl)
    with _W_LOCK:
        if is_cancelled(ctl, key):
            raise Cancelled(key)
        _W_FUNCTION[0] = key
    try:
        yield
    finally:
        with _W_LOCK:
            _W_FUNCTION[0] = None


def _marker(ctl: str, key: str) -> str:
    return os.path.join(ctl, "cancelled", key)  # keys are ours: "af<pid>x<n>.<n>"


def _address(ctl: str, pid: int) -> bytes:
    digest = hashlib.sha1(ctl.encode()).hexdigest()[:16]
    return f"\0asyncflow-parsl-{digest}-{pid}".encode()


def is_cancelled(ctl: str | None, key: str) -> bool:
    if ctl is None:
        return False
    if ctl == INPROC:
        return key in _INPROC_CANCELLED
    return os.path.exists(_marker(ctl, key))


def listen(ctl: str | None) -> None:
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
            log.warning("cannot listen for cancellations in %s", ctl, exc_info=True)
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
        if frame is not None and not _feeder_idle(frame):
            return False
    return True


def _feeder_idle(frame: FrameType | None) -> bool:
    """The feeder's stack, read from its innermost frame: waiting in
    ``threading``, called from ``_feed`` whose buffer is empty."""
    assert frame is not None
    code = frame.f_code
    if code.co_name != "wait" or not code.co_filename.endswith("threading.py"):
        return False
    while frame is not None and frame.f_code.co_name != "_feed":
        frame = frame.f_back
    buffer = frame.f_locals.get("buffer") if frame is not None else None
    return buffer is not None and not len(buffer)


# -- driver end ---------------------------------------------------------------


class Control:
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


class Canceller:
    """A backend's cancellations, routed by where each task runs: an in-process
    marker for the driver's threads, the :class:`Control` channel for worker
    processes on this host; tasks elsewhere are only forgotten."""

    __slots__ = ("_state",)

    def __init__(self, state: State):
        self._state = state

    def cancel(self, uids: Sequence[str]) -> None:
        state = self._state
        tasks = state.tasks
        mark: list[str] = []
        kill: list[str] = []
        inproc: list[str] = []
        for uid in uids:
            task = tasks.pop(uid, None)
            if task is None:
                continue
            state.cancelled[uid] = task
            profile = state.profiles[task.label]
            if profile.in_process:
                inproc.append(task.key)
            elif profile.local:
                mark.append(task.key)
                if task.command or state.kill_functions:
                    kill.append(task.key)
        if inproc:
            _INPROC_CANCELLED.update(inproc)
            _kill_here(inproc, functions=False)  # threads cannot be killed
        control = state.runtime.control
        if mark and control is not None:
            control.cancel(mark, kill)

    def forget(self, uid: str) -> None:
        """A cancelled task finally ended in Parsl: drop its marker."""
        state = self._state
        task = state.cancelled.pop(uid, None)
        if task is None:
            return
        if state.profiles[task.label].in_process:
            _INPROC_CANCELLED.discard(task.key)
        else:
            control = state.runtime.control
            if control is not None:
                control.forget([task.key])
