"""Code that runs *inside* workers, whatever the runtime.

Every adapter calls these so that a task behaves the same on every backend: the
same exception types with the worker traceback attached, the same treatment of
``async def``, and the same subprocess handling for executables.  The module
imports nothing heavy because it is imported in every worker process.
"""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import subprocess
import threading
import traceback
from collections.abc import Callable
from typing import Any

import cloudpickle

from .errors import ExecutableFailedError, TaskDefinitionError, TaskInterruptedError
from .spec import Command, TaskSpec

__all__ = [
    "call_function",
    "call_pickled",
    "dumps_function",
    "kill_command",
    "run_command",
    "run_spec",
]

_RUNNING: dict[str, subprocess.Popen[str] | None] = {}
_RUNNING_LOCK = threading.Lock()
_CANCELLED: set[str] = set()


def call_function(
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    is_async: bool,
    name: str,
) -> Any:
    """Run a task's function; ``async def`` ones get a fresh loop of their own."""
    try:
        if is_async:
            return asyncio.run(fn(*args, **kwargs))
        return fn(*args, **kwargs)
    except (SystemExit, KeyboardInterrupt) as exc:
        # Never let a task's exit request travel to the driver's event loop.
        raise TaskInterruptedError(
            f"task {name!r} raised {type(exc).__name__}({exc}) inside the worker; "
            "raise an ordinary exception to signal failure"
        ) from None
    except Exception as exc:
        _attach_traceback(exc, name)
        raise


def _attach_traceback(exc: BaseException, name: str) -> None:
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    try:
        exc.add_note(f"[asyncflow] traceback of task {name!r} in the worker:\n{text}")
    except Exception:  # pragma: no cover - exotic exception classes
        pass


def dumps_function(fn: Callable[..., Any]) -> bytes:
    """cloudpickle a function so closures and lambdas reach other processes."""
    return cloudpickle.dumps(fn)


@functools.lru_cache(maxsize=512)
def _loads(blob: bytes) -> Callable[..., Any]:
    fn: Callable[..., Any] = cloudpickle.loads(blob)
    return fn


def call_pickled(
    blob: bytes,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    is_async: bool,
    name: str,
) -> Any:
    return call_function(_loads(blob), args, kwargs, is_async, name)


def run_command(command: Command, uid: str, name: str) -> str:
    """Run a command in its own process group; return stdout or raise.

    The process group lets :func:`kill_command` (or anyone holding the pid) kill
    the command together with whatever it spawned.
    """
    if command.cwd is not None and not os.path.isdir(command.cwd):
        raise TaskDefinitionError(
            f"executable task {name!r}: cwd {command.cwd!r} does not exist on the "
            "worker; create the directory first or fix the path"
        )
    env = None
    if command.env:
        env = {**os.environ, **command.env}
    with _RUNNING_LOCK:
        _RUNNING[uid] = None  # starting: a kill now is remembered until Popen returns
    try:
        proc = subprocess.Popen(
            command.argv,
            shell=command.shell,
            cwd=command.cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
            start_new_session=True,
        )
    except (FileNotFoundError, PermissionError) as exc:
        with _RUNNING_LOCK:
            _RUNNING.pop(uid, None)
            _CANCELLED.discard(uid)
        # The list form bypasses the shell; report it the way sh would.
        code = 127 if isinstance(exc, FileNotFoundError) else 126
        raise ExecutableFailedError(
            name, code, "", f"{command.argv[0]}: {exc.strerror}", command.argv
        ) from None
    with _RUNNING_LOCK:
        _RUNNING[uid] = proc
        if uid in _CANCELLED:
            _CANCELLED.discard(uid)
            _killpg(proc)
    try:
        out, err = proc.communicate()
    finally:
        with _RUNNING_LOCK:
            _RUNNING.pop(uid, None)
    if proc.returncode != 0:
        raise ExecutableFailedError(name, proc.returncode, out, err, command.argv)
    return out


def kill_command(uid: str) -> bool:
    """Kill the process group of command ``uid`` if it runs in this process.

    Returns whether a command by that uid was running (or starting) here.
    """
    with _RUNNING_LOCK:
        if uid not in _RUNNING:
            return False
        proc = _RUNNING[uid]
        if proc is None:
            _CANCELLED.add(uid)
            return True
    _killpg(proc)
    return True


def _killpg(proc: subprocess.Popen[str]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_spec(spec: TaskSpec) -> Any:
    """Run a whole spec in this process: the simplest possible worker entry."""
    if spec.command is not None:
        return run_command(spec.command, spec.uid, spec.name)
    assert spec.function is not None
    return call_function(
        spec.function, spec.args, spec.kwargs, spec.is_async, spec.name
    )
