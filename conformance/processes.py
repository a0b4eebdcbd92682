"""What an adapter left running, told apart from what the interpreter keeps.

A few helper processes live once per interpreter: whichever code needs one
first starts it, and it stays until the interpreter exits.  multiprocessing's
resource tracker and forkserver are such helpers, and so is loky's resource
tracker (joblib ships a copy).  An adapter that happens to be the first to use
one has not leaked it, and whether it was first depends on the order the tests
ran in, so the suite leaves them out of its count.  A fixtures class names
helpers of its own runtime in ``helper_processes``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable

import psutil

__all__ = ["HELPER_SIGNS", "describe", "interpreter_helpers", "left_behind"]

#: command-line fragments of the per-interpreter helpers the suite knows
HELPER_SIGNS: tuple[str, ...] = (
    "multiprocessing.resource_tracker",
    "multiprocessing.forkserver",
    "loky.backend.resource_tracker",
)

#: (module, attribute) of each helper's singleton, whose ``_pid`` is its process
_SINGLETONS = (
    ("multiprocessing.resource_tracker", "_resource_tracker"),
    ("multiprocessing.forkserver", "_forkserver"),
    ("loky.backend.resource_tracker", "_resource_tracker"),
    ("joblib.externals.loky.backend.resource_tracker", "_resource_tracker"),
)


def interpreter_helpers(signs: Iterable[str] = ()) -> set[int]:
    """Pids of this interpreter's helpers: those its modules hold as singletons
    (read from modules already imported, never importing one), and children
    whose command line shows one of :data:`HELPER_SIGNS` or ``signs``."""
    pids: set[int] = set()
    for module, attr in _SINGLETONS:
        helper = getattr(sys.modules.get(module), attr, None)
        pid = getattr(helper, "_pid", None) or getattr(helper, "_forkserver_pid", None)
        if pid:
            pids.add(pid)
    marks = (*HELPER_SIGNS, *signs)
    for child in psutil.Process().children():
        try:
            line = " ".join(child.cmdline())
        except psutil.Error:
            continue
        if any(mark in line for mark in marks):
            pids.add(child.pid)
    return pids


def describe(pid: int) -> str:
    """``pid 12 `sleep 300` (parent 7 `python -m pytest`)``, as far as known."""

    def line(proc: psutil.Process) -> str:
        try:
            return " ".join(proc.cmdline()) or proc.name()
        except psutil.Error:
            return "?"

    try:
        proc = psutil.Process(pid)
        parent = proc.parent()
    except psutil.Error:
        return f"pid {pid} (gone)"
    where = f"parent {parent.pid} `{line(parent)}`" if parent else "no parent"
    return f"pid {pid} `{line(proc)}` ({where})"


def left_behind(before: set[int], grace: float, signs: Iterable[str] = ()) -> list[str]:
    """Descendants of this process that are new since ``before`` and still
    alive ``grace`` seconds on, helpers excepted: each described."""
    me = os.getpid()
    helpers = interpreter_helpers(signs)
    new = [
        p
        for p in psutil.Process(me).children(recursive=True)
        if p.pid not in before and p.pid not in helpers
    ]
    _, alive = psutil.wait_procs(new, timeout=grace)
    return [describe(p.pid) for p in alive if _running(p)]


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
