"""Running an executable task's command, and killing it, in any worker.

Output
    A command writes stdout and stderr to files, never to pipes read into memory;
    :mod:`asyncflow.output` turns those files into the task's value or error.  The
    files go to ``spill_dir`` (the pools pass their own temp dir), else next to the
    pid list below (the temp dir of a backend that owns its workers), else to the
    system temp dir.

Killing a command that runs in another process
    :func:`run_command` starts each command in a session of its own, so killing
    its process group kills whatever it spawned too.  In the worker process that
    runs it, :func:`kill_command` does that by task uid; an adapter calls it
    there (through the runtime's own way of running code on a worker) when the
    engine cancels the task.  A command whose worker died is out of that reach,
    as nothing stops a command when its parent dies.  For that, an adapter that
    owns its workers gives each worker's environment
    ``COMMAND_PIDS_ENV=pid_dir_under(a temp dir it owns)``: every command is then
    listed there while it runs (and carries that variable), and once the workers
    are gone, at shutdown, :func:`kill_listed` kills whatever is still listed or
    carries it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tempfile
import threading
from typing import Any

from .errors import ExecutableFailedError, TaskDefinitionError
from .output import StdoutFile, collect, tail
from .spec import Command

__all__ = [
    "COMMAND_PIDS_ENV",
    "FORK_LOCK",
    "guard_forks",
    "kill_command",
    "kill_listed",
    "pid_dir_under",
    "run_command",
]

#: Held by anything in this process that forks without exec (a process pool
#: starting its workers), and, once such a thing exists (:func:`guard_forks`),
#: while a command's Popen runs: a worker forked inside Popen would inherit
#: the write end of Popen's exec-error pipe and keep its caller waiting until
#: that worker exits.
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

_RUNNING: dict[str, subprocess.Popen[bytes] | None] = {}
#: reentrant: :func:`kill_command` may run in a signal handler (see the Ray
#: adapter's worker) on the very thread that holds it
_RUNNING_LOCK = threading.RLock()
_CANCELLED: set[str] = set()


def run_command(
    command: Command, uid: str, name: str, spill_dir: str | None = None
) -> str | bytes | StdoutFile:
    """Run a command in its own process group; return its stdout or raise.

    The process group lets :func:`kill_command` (or anyone holding the pid) kill
    the command together with whatever it spawned.
    """
    if command.cwd is not None and not os.path.isdir(command.cwd):
        raise TaskDefinitionError(
            f"executable task {name!r}: cwd {command.cwd!r} does not exist on the "
            "worker; create the directory first or fix the path"
        )
    where = spill_dir or _spill_dir()
    capture = command.capture
    out, out_fd = _stream(capture.stdout, where, uid, "stdout", name)
    try:
        err, err_fd = _stream(capture.stderr, where, uid, "stderr", name)
    except BaseException:
        os.close(out_fd)
        _discard(out, capture.stdout)
        raise
    try:
        code = _run(command, uid, name, out_fd, err_fd)  # closes both
    except BaseException:
        _discard(out, capture.stdout)
        _discard(err, capture.stderr)
        raise
    if code != 0:
        raise _failed(command, name, code, out, err)
    _discard(err, capture.stderr)
    return collect(out, capture, name, own=capture.stdout is None)


def _spill_dir() -> str:
    pids = os.environ.get(COMMAND_PIDS_ENV)
    if pids and os.path.isdir(os.path.dirname(pids)):
        return os.path.dirname(pids)
    return tempfile.gettempdir()


def _stream(
    path: str | None, where: str, uid: str, stream: str, name: str
) -> tuple[str, int]:
    """An open file for one of the command's streams: the user's, or a new one."""
    if path is None:
        fd, path = tempfile.mkstemp(prefix=f"{uid}-", suffix=f".{stream}", dir=where)
        return path, fd
    try:
        return path, os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    except OSError as exc:
        raise TaskDefinitionError(
            f"executable task {name!r}: cannot write {stream}={path!r} on the "
            f"worker ({exc.strerror}); create its directory first or fix the path"
        ) from None


def _discard(path: str, user_path: str | None) -> None:
    """Remove a stream's file unless it is the user's."""
    if user_path is None:
        with contextlib.suppress(OSError):
            os.unlink(path)


def _failed(
    command: Command, name: str, code: int, out: str, err: str
) -> ExecutableFailedError:
    """The error for a non-zero exit: each stream's tail, and its file removed
    unless the tail says the rest is there."""
    limit = command.capture.limit
    texts = []
    for path, user_path in (
        (out, command.capture.stdout),
        (err, command.capture.stderr),
    ):
        texts.append(tail(path, limit))
        if user_path is None and os.path.getsize(path) <= limit:
            with contextlib.suppress(OSError):
                os.unlink(path)
    return ExecutableFailedError(name, code, texts[0], texts[1], command.argv)


def _run(command: Command, uid: str, name: str, out: int, err: int) -> int:
    """Start the command on the given descriptors (closed here), wait, and return
    its exit code; remembered by uid while it runs, for :func:`kill_command`."""
    try:
        env = {**os.environ, **command.env} if command.env else None
        with _RUNNING_LOCK:
            _RUNNING[uid] = None  # starting: a kill now is remembered till Popen
        with _popen_guard:
            proc = subprocess.Popen(
                command.argv,
                shell=command.shell,
                cwd=command.cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,
            )
    except BaseException as exc:
        with _RUNNING_LOCK:
            _RUNNING.pop(uid, None)
            _CANCELLED.discard(uid)
        if not isinstance(exc, FileNotFoundError | PermissionError):
            raise
        # The list form bypasses the shell; report it the way sh would.
        code = 127 if isinstance(exc, FileNotFoundError) else 126
        raise ExecutableFailedError(
            name, code, "", f"{command.argv[0]}: {exc.strerror}", command.argv
        ) from None
    finally:
        os.close(out)
        os.close(err)
    with _RUNNING_LOCK:
        _RUNNING[uid] = proc
        if uid in _CANCELLED:
            _CANCELLED.discard(uid)
            _killpg(proc)
    listed = _list_pid(proc.pid)
    try:
        return proc.wait()
    finally:
        # What it left running in its session (a daemon it forked) goes with it.
        _killpg(proc)
        _reap(proc)
        with _RUNNING_LOCK:
            _RUNNING.pop(uid, None)
        if listed is not None:
            with contextlib.suppress(OSError):
                os.unlink(listed)


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
    lost its worker without being killed.  A worker killed between starting a
    command and listing it leaves the command unlisted; on Linux such a command
    is still found, as a session leader whose environment names ``pid_dir``
    (it inherited the worker's).
    """
    pids = _marked(pid_dir)
    with contextlib.suppress(OSError):
        pids.update(int(entry) for entry in os.listdir(pid_dir) if entry.isdigit())
    killed = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            os.killpg(pid, signal.SIGKILL)
            killed += 1
    return killed


def _marked(pid_dir: str) -> set[int]:
    """Session leaders (commands: each has a session of its own) whose
    environment says they were started by a worker listing in ``pid_dir``."""
    marker = f"\0{COMMAND_PIDS_ENV}={pid_dir}\0".encode()
    found: set[int] = set()
    try:
        entries = os.listdir("/proc")
    except OSError:  # not Linux: the list is all there is
        return found
    for entry in entries:
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        pid = int(entry)
        try:
            if os.getsid(pid) != pid:
                continue
            with open(f"/proc/{pid}/environ", "rb") as f:
                environ = b"\0" + f.read()
        except OSError:
            continue
        if marker in environ:
            found.add(pid)
    return found


def _reap(proc: subprocess.Popen[bytes]) -> None:
    """Collect a command just killed whose wait was interrupted (Ray's cancel
    raises KeyboardInterrupt in the worker), so that it does not stay behind as
    the worker's zombie."""
    if proc.returncode is None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)


def _killpg(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
