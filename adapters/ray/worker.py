"""What runs in Ray workers.

Ray pickles module-level functions by reference, so a worker imports this
module by its path, ``asyncflow.adapters.ray.worker``: keep them here.  The
function runner puts nested ObjectRefs back in place (Ray resolves only
top-level ones), ``EXEC`` runs executables, and ``sweep`` kills marked
commands on whichever host it runs.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import ray

import psutil  # isort: skip  (after ray, which can provide a vendored copy)

from ...commands import kill_command, run_command
from ...output import DEFAULT, Capture, StdoutFile
from ...spec import Command
from ...walk import replace
from ...worker import call_function

__all__ = ["EXEC", "MARKER", "NESTED", "Slot", "function_runner", "sweep"]

#: Environment variable set on every command this adapter runs: "<token>/<uid>".
MARKER = "ASYNCFLOW_RAY_TASK"


# -- worker side --------------------------------------------------------------
# Keyword naming how many trailing positional arguments are nested ObjectRefs.
NESTED = "_asyncflow_nested_refs_"


class Slot:
    """Stands for the n-th extra top-level argument, a nested ObjectRef."""

    __slots__ = ("index",)

    def __init__(self, index: int):
        self.index = index

    def __reduce__(self) -> tuple[type[Slot], tuple[int]]:
        return (Slot, (self.index,))


def _fill(obj: Any, values: Sequence[Any]) -> Any:
    return replace(obj, Slot, lambda slot: values[slot.index])


def function_runner(
    fn: Callable[..., Any], is_async: bool, name: str, nested: bool = False
) -> Callable[..., Any]:
    if nested:

        def run(*args: Any, **kwargs: Any) -> Any:
            slots = kwargs.pop(NESTED)
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


def _run_command(
    argv: str | list[str],
    env: dict[str, str],
    cwd: str | None,
    uid: str,
    name: str,
    capture: Capture = DEFAULT,
) -> str | bytes | StdoutFile:
    """Plain arguments, not a Command: Ray sends them through msgpack, which
    costs the driver a fraction of pickling a dataclass per call (``capture``
    only when a task sets its output options)."""
    line = argv if isinstance(argv, str) else tuple(argv)
    command = Command(line, env, cwd, capture)
    with _interrupt_kills(uid):
        return run_command(command, uid, name)


@contextlib.contextmanager
def _interrupt_kills(uid: str) -> Iterator[None]:
    """Ray cancels a running task by interrupting the worker's main thread
    (``interrupt_main``: a KeyboardInterrupt at the next bytecode).  In the
    middle of starting or waiting for a command that abandons it, unreaped (a
    zombie of the worker once the cancel's sweep kills it) or still running.
    While a command runs, the interrupt kills the command instead, which then
    ends like any killed command."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, lambda *_: kill_command(uid))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


# Shared by every backend; Ray re-exports it to each new cluster or job.
EXEC = ray.remote(max_retries=0)(_run_command)


def sweep(prefix: str, targets: frozenset[str] | None) -> int:
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
