"""Finding and killing what a radical.pilot runtime left running.

radical.pilot 1.103 does not bound its processes' lives by the driver's: the
pmgr heartbeat is never checked on the agent side, so after the driver dies the
agent runs until the pilot's walltime, and the raptor master and workers (and
the proxy workers rp forks from the driver) outlive even that.  Every one of
them works under the runtime's temp directory or pilot sandbox, so their
working directory is what finds them, whichever process group or session they
put themselves in.

This module is used twice: imported by the driver at the end of a normal
shutdown, and run as the watchdog script (``python -I -S reaper.py ...``) that
cleans up once the driver is gone.  Hence the standard library only, and no
import of the package it lives in: the watchdog must start in a few
milliseconds and must not depend on the venv the driver was running in.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import sys
import time
from collections.abc import Callable, Collection, Iterable, Mapping

__all__ = ["reap", "watch", "working_under"]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("X", "Z")


def working_under(roots: Iterable[str], skip: Collection[int] = ()) -> list[int]:
    """Pids of processes whose working directory is under one of ``roots``."""
    roots = list(roots)
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) in skip:
            continue
        try:
            cwd = os.readlink(f"/proc/{name}/cwd")
        except OSError:
            continue
        cwd = cwd.removesuffix(" (deleted)")
        if any(cwd == root or cwd.startswith(root + "/") for root in roots):
            found.append(int(name))
    return found


def reap(
    roots: Iterable[str],
    extra: Iterable[int] = (),
    skip: Iterable[int] = (),
    patience: float = 3.0,
) -> list[int]:
    """SIGKILL processes working under ``roots`` and the ``extra`` pids, with the
    process groups they lead; return the pids killed.

    SIGKILL, not SIGTERM: rp components trap SIGTERM to shut down in order, which
    takes seconds per component and needs the very ZMQ peers that are gone.
    Repeated until nothing is left (or ``patience`` runs out), because a dying
    component may still fork a task.
    """
    roots, extra = list(roots), list(extra)
    skip = set(skip) | {os.getpid()}
    own = _groups(skip)  # never kill the process group of the caller
    killed: set[int] = set()
    deadline = time.monotonic() + patience
    while True:
        pids = [
            p for p in working_under(roots, skip) + extra if p not in skip and _alive(p)
        ]
        if not pids or time.monotonic() > deadline:
            return sorted(killed)
        for pid in pids:
            _kill(pid, own)
            killed.add(pid)
        time.sleep(0.05)


def _groups(pids: Iterable[int]) -> set[int]:
    """The process groups of ``pids``; a pid already gone has none."""
    own = set()
    for pid in pids:
        try:
            own.add(os.getpgid(pid))
        except OSError:
            pass
    return own


def _kill(pid: int, own: Collection[int]) -> None:
    """SIGKILL ``pid``, and the process group it leads unless that is ``own``."""
    try:
        pgid = os.getpgid(pid)
        if pgid == pid and pgid not in own:
            os.killpg(pgid, signal.SIGKILL)
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass


def watch(driver: int, roots: list[str], keep: bool) -> None:
    """Block until the driver is gone or says ``done``; then clean up.

    The driver talks over stdin, one command a line: ``root DIR`` and ``pid N``
    add what to reap, ``orphan DIR`` a directory to delete only if the driver
    dies, ``trash DIR`` one to delete after a normal shutdown (so the driver
    need not wait for thousands of task sandboxes to go), ``done`` ends the
    watch.  EOF on stdin, or a new parent, means the driver died.
    """
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_IGN)  # a terminal's Ctrl-C is for the driver
    extra: set[int] = set()
    trash: list[str] = []
    orphans: list[str] = []
    commands: dict[str, Callable[[str], object]] = {
        "trash": trash.append,
        "orphan": orphans.append,
        "pid": lambda arg: extra.add(int(arg)),
        "root": roots.append,
    }
    if _listen(driver, commands):
        if trash and os.fork() == 0:  # delete in the background, detached
            os.setsid()
            for path in trash:
                shutil.rmtree(path, ignore_errors=True)
            os._exit(0)
        return
    reap(roots, extra, skip={driver})
    if not keep:
        for root in roots + orphans:
            shutil.rmtree(root, ignore_errors=True)


def _listen(driver: int, commands: Mapping[str, Callable[[str], object]]) -> bool:
    """Hand each of the driver's lines to its command until the driver says
    ``done`` (True) or is gone (False)."""
    buf = b""
    while os.getppid() == driver:
        if not select.select([0], [], [], 0.25)[0]:
            continue
        data = os.read(0, 4096)
        if not data:
            return False
        buf += data
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            cmd, _, arg = line.decode().partition(" ")
            if cmd == "done":
                return True
            if cmd in commands:
                commands[cmd](arg)
    return False


if __name__ == "__main__":
    watch(int(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3] == "1")
