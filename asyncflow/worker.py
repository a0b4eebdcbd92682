"""Code that runs *inside* workers, whatever the runtime.

Every adapter calls these so that a task behaves the same on every backend: the
same exception types with the worker traceback attached, the same treatment of
``async def``, and the same subprocess handling for executables.  The module
imports nothing heavy because it is imported in every worker process.

Running a task
    :func:`run_spec` runs a whole :class:`~asyncflow.spec.TaskSpec`;
    :func:`call_function` and :func:`run_command` are its two halves.  What they
    raise is what the adapter reports: the task's own exception as itself,
    :class:`~asyncflow.errors.ExecutableFailedError` for a command that exited
    non-zero, :class:`~asyncflow.errors.TaskInterruptedError` for a task that
    raised ``SystemExit`` or ``KeyboardInterrupt``.

Killing a command that runs in another process
    :func:`run_command` starts each command in a session of its own, so killing
    its process group kills whatever it spawned too.  In the worker process that
    runs it, :func:`kill_command` does that by task uid; an adapter calls it
    there (through the runtime's own way of running code on a worker) when the
    engine cancels the task.  A command whose worker died is out of that reach,
    as nothing stops a command when its parent dies.  For that, an adapter that
    owns its workers gives each worker's environment
    ``COMMAND_PIDS_ENV=pid_dir_under(a temp dir it owns)``: every command is then
    listed there while it runs, and once the workers are gone, at shutdown,
    :func:`kill_listed` kills whatever is still listed.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import pickle
import signal
import subprocess
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

import cloudpickle

from .errors import (
    ExecutableFailedError,
    SerializationError,
    TaskDefinitionError,
    TaskInterruptedError,
)
from .spec import Command, TaskSpec
from .walk import replace

__all__ = [
    "COMMAND_PIDS_ENV",
    "WORKER_ENV",
    "call_function",
    "call_pickled",
    "dumps_function",
    "kill_command",
    "kill_listed",
    "pid_dir_under",
    "run_chunk",
    "run_command",
    "run_spec",
]

#: Held by anything in this process that forks without exec (a process pool
#: starting its workers), and, once such a thing exists (:func:`guard_forks`),
#: while a command's Popen has its pipes open: a worker forked inside Popen
#: would inherit the write ends of the command's pipes and keep its caller
#: waiting until that worker exits.
FORK_LOCK = threading.Lock()
_popen_guard: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()


def guard_forks() -> None:
    """From now on, a command's Popen and FORK_LOCK's holders exclude each other
    (until then, commands started from threads do not wait for each other)."""
    global _popen_guard
    _popen_guard = FORK_LOCK


#: A backend that owns its workers names a directory here, in their environment.
#: Each running command is listed in it (a file named by its pid), so that the
#: driver can kill it at shutdown (:func:`kill_listed`) even when the worker that
#: started it was SIGKILLed: a command has a session of its own, and nothing else
#: stops it when its parent dies.
COMMAND_PIDS_ENV = "ASYNCFLOW_COMMAND_PIDS"

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


#: one pickled call: (function blob, pickled (args, kwargs), is_async, task name,
#: whether the arguments hold ChunkRefs)
Call = tuple[bytes, bytes, bool, str, bool]


class ChunkRef:
    """Stands for the value of an earlier call of the same chunk (a dependent
    that travels with its upstream, so a chain runs on in the worker)."""

    __slots__ = ("index",)

    def __init__(self, index: int):
        self.index = index

    def __reduce__(self) -> tuple[Any, ...]:
        return ChunkRef, (self.index,)


class _Skip(Exception):
    """An upstream in the chunk failed: the driver fails this call itself."""


#: a call's outcome: (ok, value or pickled value, pickled?); ok None: skipped
Outcome = tuple[bool | None, Any, bool]


#: when a call started (``time.time()``) and how many seconds it took; -1: skipped
Span = tuple[float, float]


#: names the worker a chunk ran on, where that is not the process running it
#: (radical.pilot forks a process per task from each worker)
WORKER_ENV = "ASYNCFLOW_WORKER"


def run_chunk(calls: list[Call]) -> tuple[list[Outcome], list[Span], str]:
    """Run several calls in one pool process, one after the other.

    Each outcome is pickled on its own, so that a result or exception that
    cannot be pickled fails its own task and not the chunk; only values of types
    that always pickle (numbers, strings, bytes, plain numpy arrays) travel as
    they are, so a large array is not copied twice.  A call whose
    upstream in the chunk failed is skipped (outcome ``None``).  Also returns
    when each call started and how long it took, measured here (the sender
    sizes later chunks from it, and traces show each task's own run rather than
    its chunk's), and the worker they ran on (``$ASYNCFLOW_WORKER``, or this
    process's pid).
    """
    out: list[Outcome] = []
    seconds: list[Span] = []
    values: list[Any] = []
    clock = time.perf_counter
    wall = time.time
    for blob, payload, is_async, name, linked in calls:
        began = wall()
        start = clock()
        ok = False
        try:
            args, kwargs = pickle.loads(payload)
            if linked:
                args, kwargs = _link(args, values), _link(kwargs, values)
            value = call_pickled(blob, args, kwargs, is_async, name)
            ok = True
        except _Skip:
            values.append(_SKIPPED)
            out.append((None, None, False))
            seconds.append((began, -1.0))
            continue
        except BaseException as exc:
            value = exc
        values.append(value if ok else _SKIPPED)
        if ok and _always_pickles(value):
            out.append((True, value, False))
            seconds.append((began, clock() - start))
            continue
        try:
            out.append((ok, _dumps_outcome(value), True))
        except Exception as exc:
            values[-1] = _SKIPPED  # the driver fails it: so do its dependents here
            what = "result" if ok else f"exception ({type(value).__name__})"
            error = SerializationError(
                f"task {name!r}: its {what} cannot be pickled back to the driver "
                f"({type(exc).__name__}: {exc}); return plain data, or define its "
                "types at module level"
            )
            out.append((False, pickle.dumps(error), True))
        seconds.append((began, clock() - start))
    return out, seconds, os.environ.get(WORKER_ENV) or f"pid {os.getpid()}"


_SKIPPED = object()


def _dumps_outcome(value: Any) -> bytes:
    """Pickle a call's outcome; an exception without its tracebacks.

    The worker's traceback already travels as text in the exception's note.  A
    process that imported distributed pickles exceptions *with* their tracebacks
    (it installs tblib's reducer for every exception), and a RecursionError's
    1,000 frames then exceed the recursion limit while pickling.  concurrent.futures
    drops the traceback before pickling for the same reason."""
    if isinstance(value, BaseException):
        seen: set[int] = set()
        exc: BaseException | None = value
        while exc is not None and id(exc) not in seen:
            seen.add(id(exc))
            exc.__traceback__ = None
            exc = exc.__cause__ or exc.__context__
    return pickle.dumps(value, pickle.HIGHEST_PROTOCOL)


_PLAIN = frozenset({int, float, complex, bool, str, bytes, type(None)})


def _always_pickles(value: Any) -> bool:
    t = type(value)
    if t in _PLAIN:
        return True
    if t.__name__ == "ndarray" and t.__module__ == "numpy":
        return not value.dtype.hasobject
    return False


def _link(obj: Any, values: list[Any]) -> Any:
    def value_of(ref: ChunkRef) -> Any:
        value = values[ref.index]
        if value is _SKIPPED:
            raise _Skip
        return value

    return replace(obj, ChunkRef, value_of)


def raise_error(exc: BaseException) -> None:
    """Stands in for a call that could not be packed (its error travels)."""
    raise exc


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
        with _popen_guard:
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
    listed = _list_pid(proc.pid)
    try:
        out, err = proc.communicate()
    finally:
        with _RUNNING_LOCK:
            _RUNNING.pop(uid, None)
        if listed is not None:
            with contextlib.suppress(OSError):
                os.unlink(listed)
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


def _list_pid(pid: int) -> str | None:
    pid_dir = os.environ.get(COMMAND_PIDS_ENV)
    if not pid_dir:
        return None
    path = os.path.join(pid_dir, str(pid))
    try:
        open(path, "x").close()
    except OSError:  # not listed: the worker's own clean-up still applies
        return None
    return path


def pid_dir_under(root: str) -> str:
    """Where a backend lists its workers' commands, under a temp dir it owns.

    The backend creates it before its first worker starts; a command started
    while it is missing is not listed (and so not killed by :func:`kill_listed`).
    """
    return os.path.join(root, "commands")


def kill_listed(pid_dir: str) -> int:
    """SIGKILL the process group of every command listed in ``pid_dir``.

    The driver calls it after its workers are gone, so whatever is still listed
    lost its worker without being killed.
    """
    killed = 0
    with contextlib.suppress(OSError):
        for entry in os.listdir(pid_dir):
            if entry.isdigit():
                with contextlib.suppress(OSError):
                    os.killpg(int(entry), signal.SIGKILL)
                    killed += 1
    return killed


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
