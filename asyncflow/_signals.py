"""SIGTERM ends a workflow the way Ctrl-C does: the engines shut down first.

Python's default action for SIGTERM ends the process on the spot.  For a plain
``python wf.py`` stopped by ``kill``, systemd or a batch scheduler's time limit,
that orphans running executables (they have their own process group) and pool
workers.  So when an engine binds to a loop in the main thread and nobody else
handles SIGTERM, the loop gets a handler that does what ``asyncio.run`` does for Ctrl-C:
it raises out of the loop (``SystemExit(143)``, the shell's 128 + 15), and
``asyncio.run`` cancels the remaining tasks, among them each engine's guard,
which shuts that engine down.  ``finally`` blocks run on the way out.  A second
SIGTERM meanwhile takes Python's default action.

The handler runs on the loop (through its wakeup fd), never in the middle of
whatever bytecode the main thread was running, so it cannot be swallowed the way
an exception raised from a Python-level handler is inside a gc callback,
``__del__`` or a weakref callback.  A handler installed by the user is left
alone; one marked with ``_asyncflow_sigterm`` (``asyncflow run``'s) is not.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import weakref
from typing import Any

__all__ = ["restore_handlers", "watch"]

EXIT_CODE = 128 + signal.SIGTERM

_loops: weakref.WeakSet[asyncio.AbstractEventLoop] = weakref.WeakSet()


def _ours(handler: Any) -> bool:
    return handler == signal.SIG_DFL or getattr(handler, "_asyncflow_sigterm", False)


def watch(loop: asyncio.AbstractEventLoop) -> None:
    """Handle SIGTERM on ``loop``, if this loop may own SIGTERM."""
    if loop in _loops or threading.current_thread() is not threading.main_thread():
        return
    if not _ours(signal.getsignal(signal.SIGTERM)):
        return
    try:
        loop.add_signal_handler(signal.SIGTERM, _on_sigterm, loop)
    except (NotImplementedError, RuntimeError, ValueError):
        return  # no Unix signals on this loop (Windows, a foreign loop)
    _loops.add(loop)
    global _fork_hook
    if not _fork_hook and hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=_forget_in_child)
        _fork_hook = True


_fork_hook = False


def _forget_in_child() -> None:
    """A forked child (a process-pool worker, say) inherits the loop's signal
    set-up: a do-nothing SIGTERM handler and the wakeup fd, a socket shared with
    this process.  So SIGTERM would not end the child, and would end this
    process instead.  The child gets Python's defaults back."""
    if not _loops:
        return
    _loops.clear()
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    except (ValueError, OSError):  # pragma: no cover - not the main thread
        pass


def _on_sigterm(loop: asyncio.AbstractEventLoop) -> None:
    _loops.discard(loop)
    loop.remove_signal_handler(signal.SIGTERM)  # the next one is Python's default
    # A loop callback's SystemExit leaves run_forever(); asyncio.run then cancels
    # every task, and each engine's guard task shuts its engine down.
    raise SystemExit(EXIT_CODE)


def restore_handlers() -> None:
    """Put back the Python-level SIGTERM and SIGINT handlers after a runtime's C
    code replaced them (``ray.init`` installs its own failure-signal handler,
    which aborts the process instead of letting the engine shut down)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGTERM, signal.SIGINT):
        handler = signal.getsignal(sig)
        if handler is not None:
            signal.signal(sig, handler)
