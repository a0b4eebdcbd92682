"""Shutting a runtime down within its budget, and cleaning up if the driver dies.

radical.pilot's own shutdown is neither bounded nor complete: ``session.close()``
sometimes waits out internal timeouts, the managers dump every task as JSON
first, and raptor processes survive the pilot.  So each step here runs with a
deadline (a step that overruns is abandoned, not awaited), and the last step
kills by working directory whatever is still alive (see :mod:`.reaper`).

The :class:`Watchdog` covers the case no shutdown code runs in: a SIGKILLed
driver.  It is a separate, tiny Python process started with the runtime.
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from . import reaper
from ._rp import FINAL, ru

__all__ = [
    "Watchdog",
    "children",
    "close_session",
    "log_tail",
    "mp_tempdir",
    "outside_roots",
    "proxy_pids",
    "remove_leftovers",
    "stop_pilot",
]

log = logging.getLogger("asyncflow.radical")


class Watchdog:
    """A child process that cleans up after this driver if it dies.

    Its own session, so that a terminal's Ctrl-C or a kill of the driver's
    process group does not take it down with the driver; ``-I -S`` so that it
    starts in milliseconds and imports nothing from the driver's environment.
    """

    def __init__(self, roots: list[str], keep: bool):
        argv = [str(os.getpid()), json.dumps(roots), "1" if keep else "0"]
        self._proc = subprocess.Popen(
            [sys.executable, "-I", "-S", reaper.__file__, *argv],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            close_fds=True,
        )
        self._lock = threading.Lock()

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def alive(self) -> bool:
        return self._proc.poll() is None

    def tell(self, line: str) -> None:
        with self._lock:
            stdin = self._proc.stdin
            if stdin is None or stdin.closed:
                return
            try:
                stdin.write(line.encode() + b"\n")
                stdin.flush()
            except (BrokenPipeError, ValueError):
                pass

    def stop(self) -> None:
        self.tell("done")
        with self._lock:
            if self._proc.stdin is not None:
                with contextlib.suppress(OSError):
                    self._proc.stdin.close()
        try:
            self._proc.wait(5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()


# -- processes radical.pilot forks from the driver ------------------------------


def mp_tempdir() -> str | None:
    """multiprocessing's temp directory for this process, if it made one yet."""
    config: dict[str, Any] = getattr(multiprocessing.current_process(), "_config", {})
    return config.get("tempdir")


def children() -> set[int]:
    """This process's children, whichever thread started them."""
    found: set[int] = set()
    me = os.getpid()
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{me}/task"):
            with (
                contextlib.suppress(OSError),
                open(f"/proc/{me}/task/{tid}/children") as f,
            ):
                found.update(int(p) for p in f.read().split())
    return found


def proxy_pids(session: Any, before: set[int]) -> list[int]:
    """The proxy workers the session forked from this process.

    They share the driver's working directory, so the reaper cannot find them
    by it; their pids are handed over explicitly.
    """
    with contextlib.suppress(Exception):
        clients = session._proxy._clients  # radical.pilot internals, checked
        pids = [int(c["proc"].pid) for c in clients.values()]
        if pids:
            return pids
    mine = _cmdline(os.getpid())  # forked, not exec'd: same command line
    return sorted(p for p in children() - before if _cmdline(p) == mine)


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def outside_roots(base: str, session: Any, sandbox: str | None) -> list[str]:
    """Where ``session`` leaves files outside ``base``, for the reaper."""
    roots = []
    # radical.utils fixed its id-counter directory when this process imported
    # it (~/.radical/utils unless RADICAL_BASE was set); the session's
    # counters go to a subdirectory named after the session
    counters = getattr(ru.ids, "_BASE", None)
    if counters and not os.path.realpath(counters).startswith(base):
        roots.append(os.path.join(counters, session.uid))
    if sandbox:  # the user's sandbox: only our session's part of it
        real = os.path.realpath(sandbox)
        roots.append(os.path.join(real, "radical.pilot.sandbox", session.uid))
    return roots


def log_tail(session: Any, pilot: Any) -> str:
    """The last lines of the logs that explain a pilot that did not start."""
    files = []
    if session is not None:
        with contextlib.suppress(Exception):
            files.append(os.path.join(session.path, "pmgr_launching.0000.log"))
    if pilot is not None:
        with contextlib.suppress(Exception):
            sandbox = ru.Url(pilot.pilot_sandbox).path
            files += [
                os.path.join(sandbox, name)
                for name in ("bootstrap_0.out", "agent_0.err")
            ]
    out = []
    for path in files:
        try:
            with open(path, errors="replace") as f:
                tail = f.read().strip().splitlines()[-6:]
        except OSError:
            continue
        if tail:
            out.append(f"\n[{os.path.basename(path)}] " + "\n".join(tail))
    return "".join(out)


# -- the shutdown steps ------------------------------------------------------------


def bounded(
    fn: Callable[[], Any], timeout: float, until: Callable[[], bool] | None = None
) -> None:
    """Run a blocking radical.pilot call, giving up (not waiting) after timeout,
    or as soon as ``until()`` says its work is done anyway."""
    done = threading.Event()

    def run() -> None:
        try:
            fn()
        except Exception:
            log.debug("radical.pilot shutdown step failed", exc_info=True)
        finally:
            done.set()

    th = threading.Thread(target=run, name="asyncflow-radical-close", daemon=True)
    try:
        th.start()
    except RuntimeError:  # interpreter shutdown (atexit, Python >= 3.12)
        run()
        return
    deadline = time.monotonic() + max(0.1, timeout)
    step = 0.25 if until is not None else timeout
    while not done.wait(max(0.0, min(step, deadline - time.monotonic()))):
        if time.monotonic() >= deadline or (until is not None and until()):
            return


def stop_pilot(
    pmgr: Any, pilot: Any, deadline: float, gone: Callable[[], bool] | None = None
) -> None:
    """Cancel the pilot, and kill it if cancelling does not end it in time.

    Cancelling first lets the agent stop its components in order, which spares
    the reaper most of its work; the remaining budget leaves room for the
    session and the reaper.  ``gone()`` says a pilot's batch job has left the
    queue, which radical.pilot notices only seconds later; such a pilot gets
    less time, and no kill: its caller cancels the batch job itself, which
    works even when radical.pilot's components were killed with the driver's
    process group (Ctrl-C, SIGTERM).
    """
    if pmgr is None or pilot is None or pilot.state in FINAL:
        return
    bounded(
        lambda: pmgr.cancel_pilots(uids=[pilot.uid], _timeout=6),
        min(8.0 if gone is None else 4.0, deadline - time.monotonic() - 5),
        gone,
    )
    if pilot.state not in FINAL and gone is None:
        bounded(
            lambda: pmgr.kill_pilots(uids=[pilot.uid], _timeout=2),
            min(3.0, deadline - time.monotonic() - 4),
        )


def close_session(
    session: Any, managers: Sequence[Any], keep_files: bool, deadline: float
) -> None:
    if session is None:
        return
    if not keep_files:
        # the managers' close() dumps every task as JSON: O(tasks), and into a
        # directory that is deleted next
        for mgr in managers:
            if mgr is not None:
                mgr.dump = _no_dump
    bounded(
        lambda: session.close(download=False, terminate=False),
        max(1.0, deadline - time.monotonic() - 1),
    )


def _no_dump(*_: Any, **__: Any) -> None:
    pass


def remove_leftovers(
    roots: Sequence[str],
    extra_pids: Sequence[int],
    watchdog: Watchdog | None,
    keep_files: bool,
) -> None:
    """Kill what still runs under ``roots``, then remove them and stop the watchdog.

    Thousands of task sandboxes take seconds to delete, so the directories are
    only renamed here and the watchdog deletes them as it exits.
    """
    if roots:
        skip = {os.getpid(), *(w.pid for w in [watchdog] if w)}
        reaper.reap(roots, extra_pids, skip=skip)
    for pid in extra_pids:  # our own children: do not leave zombies
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)
    if not keep_files:
        for root in roots:
            _discard(root, watchdog)
    if watchdog is not None:
        watchdog.stop()


def _discard(root: str, watchdog: Watchdog | None) -> None:
    """Rename ``root`` aside for the watchdog to delete as it exits; delete it
    here only where no watchdog lives or the rename fails."""
    trash = f"{root}.deleting"
    try:
        os.rename(root, trash)
    except OSError:
        shutil.rmtree(root, ignore_errors=True)
        return
    if watchdog is not None and watchdog.alive:
        watchdog.tell(f"trash {trash}")
    else:
        shutil.rmtree(trash, ignore_errors=True)
