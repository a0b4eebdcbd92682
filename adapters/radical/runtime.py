"""One radical.pilot session, pilot and raptor, from start to a clean close.

A session plus an active pilot takes 20-80 s and some thirty processes, and
every step of it blocks, while the docs page's constructor is synchronous and
the engine's loop must not stall.  So a :class:`RadicalRuntime` starts in a
background thread the moment it is created, and ``start()`` returns a future.
It is a separate object from the backend so that several backends (every test
of a session, or raw radical.pilot next to asyncflow in a benchmark) can share
one expensive pilot; only its creator closes it.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import contextlib
import itertools
import os
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Mapping
from typing import Any

from ...errors import BackendStartError, EngineClosedError
from . import cleanup, raptor_entry
from ._rp import FINAL, rp
from .batch import SlurmPilot
from .config import plan, spawn_environment
from .dispatch import Dispatcher

__all__ = ["RadicalRuntime"]

LOCAL_START_TIMEOUT = 600.0
RAPTOR_START_TIMEOUT = 300.0  # after the pilot is active; it takes 2-30 s
SHUTDOWN_BUDGET = 15.0


class RadicalRuntime:
    """One radical.pilot session with one pilot, which backends run tasks on.

    ``RadicalRuntime({'resource': 'local.localhost'})`` describes it; ``start()``
    brings it up in a background thread (``wait_ready()`` blocks until the pilot
    is active), ``close()`` shuts it down within 15 s and removes its files.
    ``RadicalExecutionBackend(runtime=rt)`` attaches a backend that leaves the
    runtime running when it shuts down.  Also a context manager.

    Options: ``keep_files`` keeps the session and sandbox directories,
    ``workdir`` is where the temp directory goes (default: the system temp dir),
    ``function_cores`` sizes the raptor workers (0: no function tasks),
    ``start_timeout`` bounds the wait for the pilot (default 600 s on
    local.localhost, unbounded elsewhere: batch queues take their time).

    ``'resource': 'slurm'`` submits the pilot to this host's Slurm cluster as
    a batch job of exactly the dict's partition, nodes, walltime and account
    (see :mod:`.batch`); its temp directory then goes to the current directory
    by default, which the nodes share, unlike the login node's /tmp.
    """

    _ids = itertools.count(1)

    def __init__(
        self,
        resources: Mapping[str, Any] | None = None,
        *,
        keep_files: bool = False,
        workdir: str | None = None,
        function_cores: int | None = None,
        start_timeout: float | None = None,
    ):
        self.layout = plan(resources, function_cores)
        self.keep_files = keep_files
        #: the pilot's batch job, for ``'resource': 'slurm'``
        self.slurm: SlurmPilot | None = None
        if self.layout.allocation is not None:
            self.slurm = SlurmPilot(self.layout.allocation, self.pilot_lost)
            workdir = workdir or os.getcwd()
        self._workdir = workdir
        if start_timeout is None and self.layout.local:
            start_timeout = LOCAL_START_TIMEOUT
        self._start_timeout = start_timeout
        prefix = f"af{os.getpid()}.{next(self._ids)}."
        self._prefix = prefix
        self.dispatcher = Dispatcher(
            prefix, [p for p in sys.path if p], self._lost_raptor
        )
        self.base: str | None = None
        self.session: Any = None
        self.pilot: Any = None
        self.pmgr: Any = None
        self.tmgr: Any = None
        self.raptor: Any = None
        self._watchdog: cleanup.Watchdog | None = None
        self._roots_extra: list[str] = []
        self._extra_pids: list[int] = []
        self._ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread: threading.Thread | None = None
        self._state_lock = threading.Lock()
        self._abort = threading.Event()
        self._closed = False
        self._close_done = threading.Event()
        self.broken: str | None = None  # why no task can run any more
        self._broken_lock = threading.Lock()
        self.functions_broken: str | None = None
        self.timings: dict[str, float] = {}

    # -- start -----------------------------------------------------------------------
    def __enter__(self) -> RadicalRuntime:
        self.start().result()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> concurrent.futures.Future[None]:
        """Start in a background thread (once); the future resolves when ready."""
        with self._state_lock:
            if self._closed:
                raise EngineClosedError("this RadicalRuntime was closed")
            if self._thread is None:
                _LIVE.add(self)
                self._thread = threading.Thread(
                    target=self._start, name="asyncflow-radical-start", daemon=True
                )
                self._thread.start()
        return self._ready

    def wait_ready(self, timeout: float | None = None) -> None:
        self.start().result(timeout)

    @property
    def ready(self) -> bool:
        return self._ready.done() and self._ready.exception() is None

    def _start(self) -> None:
        t0 = time.monotonic()
        try:
            self._bring_up(t0)
        except BaseException as exc:
            err = exc
            if not isinstance(exc, BackendStartError):
                err = BackendStartError(
                    f"radical.pilot failed to start a pilot on "
                    f"{self.layout.resource!r}: {type(exc).__name__}: {exc}"
                    f"{self._pilot_log_tail()}"
                )
                err.__cause__ = exc
            with contextlib.suppress(concurrent.futures.InvalidStateError):
                self._ready.set_exception(err)  # unless close() got there first
        else:
            self.timings["ready"] = time.monotonic() - t0
            with contextlib.suppress(concurrent.futures.InvalidStateError):
                self._ready.set_result(None)
            if self.layout.function_cores:
                self._watch_raptor(t0)

    def _bring_up(self, t0: float) -> None:
        base, watchdog = self._make_base()
        self._open_session(base, watchdog)
        self.timings["session"] = time.monotonic() - t0
        self._check_abort()
        self.dispatcher.attach(self.tmgr)
        pd = self._description(base, watchdog)
        self.pilot = self.pmgr.submit_pilots(rp.PilotDescription(pd))
        self.pilot.register_callback(self._on_pilot_state)
        self.tmgr.add_pilots(self.pilot)
        if self.layout.function_cores:
            self._start_raptor()
        self._wait_active()
        self.timings["pilot_active"] = time.monotonic() - t0
        self.dispatcher.start()

    def _make_base(self) -> tuple[str, cleanup.Watchdog]:
        """The temp directory, watched from the start in case the driver dies."""
        if self._workdir:
            os.makedirs(self._workdir, exist_ok=True)
        base = os.path.realpath(
            tempfile.mkdtemp(prefix="asyncflow-rp-", dir=self._workdir or None)
        )
        self.base = base
        self.dispatcher.tickets = os.path.join(base, "cancelled")
        os.makedirs(self.dispatcher.tickets)
        watchdog = self._watchdog = cleanup.Watchdog([base], self.keep_files)
        return base, watchdog

    def _open_session(self, base: str, watchdog: cleanup.Watchdog) -> None:
        """The session and its managers; the watchdog learns what they leave."""
        before = cleanup.children()
        mp_before = cleanup.mp_tempdir()
        extra = self.slurm.prepare(base) if self.slurm else {}
        with spawn_environment(base, extra):
            self.session = rp.Session(cfg={"base": base, "client_sandbox": base})
            self._check_abort()
            self.pmgr = rp.PilotManager(session=self.session)
            self._check_abort()
            self.tmgr = rp.TaskManager(session=self.session)
        self._extra_pids = cleanup.proxy_pids(self.session, before)
        for pid in self._extra_pids:
            watchdog.tell(f"pid {pid}")
        # the session's proxy made multiprocessing create its temp directory,
        # which Python removes at exit, unless the driver is killed
        mp_tmp = cleanup.mp_tempdir()
        if mp_tmp and mp_tmp != mp_before:
            watchdog.tell(f"orphan {mp_tmp}")

    def _description(self, base: str, watchdog: cleanup.Watchdog) -> dict[str, Any]:
        """The planned pilot, its sandbox under ``base`` unless the user's is."""
        pd = dict(self.layout.description)
        self._roots_extra = cleanup.outside_roots(base, self.session, pd.get("sandbox"))
        if not pd.get("sandbox"):
            pd["sandbox"] = base
        if self.slurm:
            pd["job_name"] = self.slurm.job_name
        for root in self._roots_extra:
            watchdog.tell(f"root {root}")
        return pd

    def _wait_active(self) -> None:
        lay = self.layout
        deadline = None
        if self._start_timeout is not None:
            deadline = time.monotonic() + self._start_timeout
        want = [rp.PMGR_ACTIVE, *rp.FINAL]
        while self.pilot.state not in want:
            self._check_abort()
            if deadline is not None and time.monotonic() > deadline:
                raise BackendStartError(
                    f"the pilot on {lay.resource!r} did not become active within "
                    f"{self._start_timeout:.0f} s (state {self.pilot.state}); raise "
                    f"start_timeout= or check the pilot sandbox{self._pilot_log_tail()}"
                )
            self.pilot.wait(want, timeout=0.5)  # short: close() may abort us
        if self.pilot.state != rp.PMGR_ACTIVE:
            raise BackendStartError(
                f"the pilot on {lay.resource!r} ended as {self.pilot.state} before "
                f"it became active{self._pilot_log_tail()}"
            )

    def _start_raptor(self) -> None:
        lay = self.layout
        master = rp.TaskDescription(
            {
                "mode": rp.RAPTOR_MASTER,
                "uid": self._prefix + "raptor",
                "ranks": 1,
                "cores_per_rank": 1,
            }
        )
        self.raptor = self.tmgr.submit_raptors([master], pilot_id=self.pilot.uid)[0]
        # raptor's own worker would import each task's module in every task, and
        # never report a task whose process died
        worker = {
            "raptor_class": "AsyncflowWorker",
            "raptor_file": raptor_entry.__file__,
        }
        workers = [
            rp.TaskDescription(
                {
                    "mode": rp.RAPTOR_WORKER,
                    "uid": f"{self._prefix}worker.{i}",
                    "ranks": 1,
                    "cores_per_rank": lay.worker_cores,
                    **worker,
                }
            )
            for i in range(lay.n_workers)
        ]
        self.dispatcher.raptor_id = self.raptor.uid
        self.dispatcher.raptor_uids = {self.raptor.uid, *(w.uid for w in workers)}
        self.raptor.submit_workers(workers)

    def _watch_raptor(self, t0: float) -> None:
        """Bound the wait for raptor, which comes up after the pilot.

        Under heavy load an agent has been seen to go quiet right after the pilot
        became active: the raptor master never arrived, and function tasks would
        have waited forever.  After ``RAPTOR_START_TIMEOUT`` they fail instead.
        """
        deadline = time.monotonic() + RAPTOR_START_TIMEOUT
        while not self.dispatcher.raptor_up.wait(0.5):
            if self._abort.is_set():
                return
            if time.monotonic() > deadline:
                self._functions_lost(
                    f"the raptor workers did not start within "
                    f"{RAPTOR_START_TIMEOUT:.0f} s of the pilot becoming active"
                    f"{self._pilot_log_tail()}"
                )
                return
        self.timings["raptor_up"] = time.monotonic() - t0

    def _check_abort(self) -> None:
        if self._abort.is_set():
            raise BackendStartError("the runtime was closed while it was starting")

    def _pilot_log_tail(self) -> str:
        return cleanup.log_tail(self.session, self.pilot)

    # -- health (radical.pilot's callback threads) --------------------------------
    def _on_pilot_state(self, pilots: Any, *_: Any) -> None:
        # radical.pilot 1.103 calls pilot callbacks with a list of pilots
        for pilot in pilots if isinstance(pilots, list) else [pilots]:
            if pilot.state in FINAL and not self._closed:
                self.pilot_lost()

    def pilot_lost(self, reason: str | None = None) -> str:
        """The pilot is gone: say why once, and fail every task still in flight.

        Called by radical.pilot's pilot callback, by the Slurm job's watch, and
        by the backend for a task radical.pilot failed because its pilot died,
        whichever comes first: the first reason is the one every task gets.
        radical.pilot fails the tasks it holds, but not those on their way to
        it, which would then wait for ever.
        """
        with self._broken_lock:
            first = self.broken is None
            if first:
                self.broken = reason or self._why_pilot_ended()
            broken = self.broken
        assert broken is not None
        if first and not self._closed:
            self.dispatcher.fail_all(broken)
        return broken

    def job_gone(self) -> str | None:
        """For a task killed by a signal: did the pilot's batch job end under it?"""
        if self.broken or self.slurm is None:
            return self.broken
        why = self.slurm.gone()
        return None if why is None else self.pilot_lost(f"the pilot's {why}")

    def _why_pilot_ended(self) -> str:
        uid, state = getattr(self.pilot, "uid", "?"), getattr(self.pilot, "state", "")
        if self.slurm is not None:
            return self.slurm.ended(uid, state)
        return f"the pilot {uid} on {self.layout.resource!r} ended ({state})"

    def _lost_raptor(self, task: Any, state: str) -> None:
        detail = task.exception or "no detail"
        self._functions_lost(f"raptor task {task.uid} ended ({state}: {detail})")

    def _functions_lost(self, reason: str) -> None:
        if self._closed or self.functions_broken:
            return
        self.functions_broken = reason
        self.dispatcher.fail_functions(reason)

    # -- close -----------------------------------------------------------------------
    def close(self, timeout: float = SHUTDOWN_BUDGET) -> None:
        """Cancel the pilot, close the session, kill leftovers, remove files.

        Blocking and idempotent; bounded by ``timeout`` (plus the reaper's 3 s).
        """
        with self._state_lock:
            first = not self._closed
            self._closed = True
            thread = self._thread
        if not first:
            self._close_done.wait(timeout + 10)
            return
        try:
            self._close(thread, timeout)
        finally:
            _LIVE.discard(self)
            self._close_done.set()

    def _close(self, thread: threading.Thread | None, timeout: float) -> None:
        t0 = time.monotonic()
        deadline = t0 + timeout
        self._abort.set()
        if thread is not None:  # a start in progress cannot be interrupted
            thread.join(30 if not self._ready.done() else 1)
        self.dispatcher.stop()
        gone = self.slurm.over if self.slurm is not None else None
        cleanup.stop_pilot(self.pmgr, self.pilot, deadline, gone)
        self.timings["pilot_final"] = time.monotonic() - t0
        if self.slurm is not None:  # nothing of the pilot left in the queue
            self.slurm.close()
            self.timings["jobs_gone"] = time.monotonic() - t0
        cleanup.close_session(
            self.session, [self.tmgr, self.pmgr], self.keep_files, deadline
        )
        self.timings["session_closed"] = time.monotonic() - t0
        roots = [r for r in [self.base, *self._roots_extra] if r]
        cleanup.remove_leftovers(
            roots, self._extra_pids, self._watchdog, self.keep_files
        )
        self.timings["closed"] = time.monotonic() - t0
        with contextlib.suppress(concurrent.futures.InvalidStateError):
            self._ready.set_exception(
                BackendStartError("the runtime was closed before it became ready")
            )


_LIVE: weakref.WeakSet[RadicalRuntime] = weakref.WeakSet()


@atexit.register
def _close_at_exit() -> None:
    """Ctrl-C, or an exception escaping ``asyncio.run``: close what is still up."""
    for runtime in list(_LIVE):
        with contextlib.suppress(Exception):
            runtime.close()
