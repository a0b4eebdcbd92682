"""Every error asyncflow raises, under one root.

A task's *own* exception is never wrapped: a ``ValueError`` raised in a worker comes
back as that ``ValueError``, with the worker-side traceback attached as a note.  The
classes below describe what asyncflow itself has to say::

    AsyncflowError
    ├── TaskDefinitionError(AsyncflowError, TypeError)   bad declaration or input
    ├── SerializationError(AsyncflowError, TypeError)    cannot ship a function/value
    ├── ResourceUnavailableError(AsyncflowError)         request that can never be met
    ├── BackendError(AsyncflowError)
    │   ├── BackendNotInstalledError(BackendError, ImportError)
    │   ├── BackendStartError(BackendError)
    │   └── WorkerLostError(BackendError)                the worker died under the task
    ├── EngineClosedError(AsyncflowError, RuntimeError)  used after shutdown()
    ├── TaskTimeoutError(AsyncflowError, TimeoutError)   ``timeout=`` ran out
    ├── TaskInterruptedError(AsyncflowError)             SystemExit/Ctrl-C in a task
    ├── DependencyFailureError(AsyncflowError)           an upstream task failed
    ├── ExecutableFailedError(AsyncflowError, RuntimeError)  a command exited non-zero
    └── OutputDecodeError(AsyncflowError, ValueError)    stdout is not UTF-8 text

Cancellation is plain :class:`asyncio.CancelledError`, as everywhere in asyncio.

Every class here pickles with its attributes, because workers raise some of them
in other processes.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "AsyncflowError",
    "BackendError",
    "BackendNotInstalledError",
    "BackendStartError",
    "DependencyFailureError",
    "EngineClosedError",
    "ExecutableFailedError",
    "OutputDecodeError",
    "ResourceUnavailableError",
    "SerializationError",
    "TaskDefinitionError",
    "TaskInterruptedError",
    "TaskTimeoutError",
    "WorkerLostError",
]


class AsyncflowError(Exception):
    """Root of everything asyncflow raises on its own account."""


class TaskDefinitionError(AsyncflowError, TypeError):
    """A task was declared or called in a way that can never run."""


class SerializationError(AsyncflowError, TypeError):
    """A function, argument or result could not be shipped to or from a worker."""


class ResourceUnavailableError(AsyncflowError):
    """The task asks for resources the backend can never provide.

    Raised at once instead of letting the runtime wait forever for them.
    """


class BackendError(AsyncflowError):
    """The runtime under a backend misbehaved."""


class BackendNotInstalledError(BackendError, ImportError):
    """The runtime's Python package is missing; the message names the extra."""


class BackendStartError(BackendError):
    """The backend could not start its runtime."""


class WorkerLostError(BackendError):
    """The worker (process, node, pilot) running the task went away."""


class EngineClosedError(AsyncflowError, RuntimeError):
    """The engine was used after ``shutdown()``."""


class TaskTimeoutError(AsyncflowError, TimeoutError):
    """The task ran longer than its ``timeout=``; its work was cancelled."""


class TaskInterruptedError(AsyncflowError):
    """The task raised SystemExit or KeyboardInterrupt inside a worker.

    Converted so that a task cannot stop the driver's event loop.
    """


class DependencyFailureError(AsyncflowError):
    """The task never ran because a task it depends on failed.

    ``__cause__`` is the root exception; ``upstream`` names the failed tasks this
    task depended on directly, and ``root`` the task whose own code failed.
    """

    def __init__(self, task: str, upstream: Sequence[str], root: str, cause: str):
        self.task = task
        self.upstream = tuple(upstream)
        self.root = root
        names = ", ".join(repr(u) for u in self.upstream)
        via = "" if self.upstream == (root,) else f" (root failure in {root!r})"
        super().__init__(
            f"task {task!r} was not run: upstream task {names} failed{via}: {cause}"
        )

    # radical.asyncflow's names for the same facts, so its scripts run unchanged
    @property
    def failed_dependencies(self) -> list[str]:
        """The failed tasks this one depended on directly (``upstream``)."""
        return list(self.upstream)

    @property
    def root_cause(self) -> BaseException | None:
        """The exception of the task whose own code failed (``__cause__``)."""
        return self.__cause__

    def __reduce__(self):
        return (
            _rebuild_dependency_failure,
            (self.task, self.upstream, self.root, self.args[0]),
        )


def _rebuild_dependency_failure(task, upstream, root, message):
    err = DependencyFailureError.__new__(DependencyFailureError)
    err.task, err.upstream, err.root = task, tuple(upstream), root
    Exception.__init__(err, message)
    return err


class ExecutableFailedError(AsyncflowError, RuntimeError):
    """An executable task's command exited with a non-zero code.

    A ``RuntimeError`` too, as in radical.asyncflow, whose scripts catch it so.

    Carries ``stdout`` and ``stderr`` (their last ``output_limit=`` bytes, see
    :mod:`asyncflow.output`) and the ``exit_code`` (negative for a signal, as in
    :mod:`subprocess`).
    """

    def __init__(
        self,
        task: str,
        exit_code: int,
        stdout: str,
        stderr: str,
        command: str | Sequence[str] = "",
    ):
        self.task = task
        self.exit_code = exit_code
        self.stdout = stdout
        self.stderr = stderr
        self.command = command
        tail = stderr.strip().splitlines()[-3:]
        detail = ("; stderr: " + " | ".join(tail)) if tail else ""
        hint = ""
        if exit_code == 127:
            hint = " (command not found: check the program name and PATH)"
        super().__init__(
            f"executable task {task!r} exited with code {exit_code}{hint}{detail}"
        )

    def __reduce__(self):
        return (
            type(self),
            (self.task, self.exit_code, self.stdout, self.stderr, self.command),
        )


class OutputDecodeError(AsyncflowError, ValueError):
    """A command succeeded but its stdout is not UTF-8, and ``text=False`` was not
    given: decoding it with replacement characters would lose bytes silently."""

    def __init__(self, task: str, stream: str, reason: object):
        self.task, self.stream, self.reason = task, stream, str(reason)
        super().__init__(
            f"executable task {task!r}: its {stream} is not UTF-8 text "
            f"({reason}); declare the task with text=False to get bytes, or "
            f"{stream}='PATH' to keep the output in a file"
        )

    def __reduce__(self):
        return (type(self), (self.task, self.stream, self.reason))
