"""Task declarations (what the decorators return) and dependency discovery.

Validation happens here, at decoration time, so that a mistake is reported where
it was made, naming the task, instead of when the task finally runs.
"""

from __future__ import annotations

import copy
import enum
import functools
import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import TaskDefinitionError
from .future import TaskFuture
from .output import DEFAULT, Capture
from .spec import Resources, check_env
from .walk import find, replace

if TYPE_CHECKING:
    from .engine import WorkflowEngine
    from .protocol import ExecutionBackend

__all__ = ["TaskDecl", "TaskKind", "TaskOptions", "collect_futures", "substitute"]


class TaskKind(enum.Enum):
    FUNCTION = "function"
    EXECUTABLE = "executable"
    BLOCK = "block"


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_timeout(value: object) -> bool:
    return value is None or (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    )


#: keyword -> (whether a value is valid, what to say when it is not)
_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "retries": (_is_count, "retries= must be a whole number >= 0, got {!r}"),
    "timeout": (
        _is_timeout,
        "timeout= must be a positive number of seconds, got {!r}",
    ),
    "options": (
        lambda v: v is None or isinstance(v, Mapping),
        "options= must be a dict of backend-specific settings",
    ),
    "service": (
        lambda v: isinstance(v, bool),
        "service= must be True or False, got {!r}",
    ),
    "chunk": (
        lambda v: isinstance(v, bool),
        "chunk= must be True or False, got {!r}",
    ),
    "cache": (
        lambda v: isinstance(v, bool),
        "cache= must be True or False (False: never reuse a stored result), got {!r}",
    ),
    "version": (
        lambda v: v is None or isinstance(v, str | int),
        "version= must be a string or a number, got {!r}",
    ),
}


def _check(task: str, keyword: str, value: object) -> None:
    valid, message = _RULES[keyword]
    if not valid(value):
        raise TaskDefinitionError(f"task {task!r}: " + message.format(value))


@dataclass(frozen=True, slots=True)
class TaskOptions:
    retries: int = 0
    timeout: float | None = None
    resources: Resources = field(default_factory=Resources)
    backend: str | None = None
    env: Mapping[str, str] | None = None
    cwd: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    service: bool = False
    #: whether the backend may run calls several to one runtime call
    chunk: bool = True
    #: an executable's ``stdout=``/``stderr=``/``text=``/``output_limit=``
    capture: Capture = DEFAULT
    #: with a result store: whether this task's results are stored and reused
    #: (``False`` for a task that must run every time), and a version that
    #: invalidates them without a change to the code
    cache: bool = True
    version: str | None = None

    @classmethod
    def build(
        cls,
        name: str,
        *,
        retries: int = 0,
        timeout: float | None = None,
        resources: Any = None,
        backend: str | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        options: Mapping[str, Any] | None = None,
        service: bool = False,
        chunk: bool = True,
        stdout: Any = None,
        stderr: Any = None,
        text: Any = True,
        output_limit: Any = None,
        cache: bool = True,
        version: Any = None,
    ) -> TaskOptions:
        _check(name, "retries", retries)
        _check(name, "timeout", timeout)
        check_env(env, name)
        _check(name, "options", options)
        _check(name, "service", service)
        _check(name, "chunk", chunk)
        _check(name, "cache", cache)
        _check(name, "version", version)
        return cls(
            retries,
            None if timeout is None else float(timeout),
            Resources.coerce(resources, name),
            backend,
            env,
            None if cwd is None else str(cwd),
            dict(options or {}),
            service,
            chunk,
            Capture.build(name, stdout, stderr, text, output_limit),
            cache,
            None if version is None else str(version),
        )


class TaskDecl:
    """A decorated function: calling it creates a task and returns its future."""

    def __init__(
        self,
        engine: WorkflowEngine,
        fn: Callable[..., Any],
        kind: TaskKind,
        opts: TaskOptions,
        backend: ExecutionBackend | None = None,
    ):
        if not callable(fn):
            raise TaskDefinitionError(
                f"@{_decorator(kind)} needs a function, got {fn!r} of type "
                f"{type(fn).__name__}; decorate a def or async def"
            )
        self.engine = engine
        self._call = engine.scheduler.call
        self.fn = fn
        self.kind = kind
        self.opts = opts
        self.backend = backend  # resolved once here, not per call
        #: (definition-time task_description, the decorator's own keywords), for
        #: a call that brings a task_description of its own
        self.described: tuple[dict[str, Any], dict[str, Any]] = ({}, {})
        self.name: str = getattr(fn, "__name__", None) or type(fn).__name__
        self.is_async = inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
            type(fn).__call__
        )
        functools.update_wrapper(self, fn)

    def __call__(self, *args: Any, **kwargs: Any) -> TaskFuture:
        if "task_description" in kwargs:
            return self._call(
                self._described(kwargs.pop("task_description")), args, kwargs
            )
        return self._call(self, args, kwargs)

    def _described(self, call_description: Any) -> TaskDecl:
        """This task with a call's ``task_description`` over its own."""
        from .description import merge, translate

        if call_description is None:
            return self
        description, opts = self.described
        if not isinstance(call_description, Mapping):
            merged: Any = call_description  # translate names the bad type
        else:
            merged = merge(description, call_description)
        variant = copy.copy(self)
        variant.opts = TaskOptions.build(
            self.name, **translate(merged, self.name, self.backend, opts)
        )
        return variant

    def __repr__(self) -> str:
        return f"<{_decorator(self.kind)} {self.name}>"


def _decorator(kind: TaskKind) -> str:
    return {
        TaskKind.FUNCTION: "function_task",
        TaskKind.EXECUTABLE: "executable_task",
        TaskKind.BLOCK: "block",
    }[kind]


_FUTURES = frozenset({TaskFuture})


def collect_futures(args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[TaskFuture]:
    """Every TaskFuture in args/kwargs, nested in builtin containers, once each."""
    found = find((args, kwargs) if kwargs else args, _FUTURES)
    if len(found) > 1:
        found = list({id(f): f for f in found}.values())
    return found


def substitute(obj: Any, value_of: Callable[[TaskFuture], Any]) -> Any:
    """A copy of ``obj`` with every TaskFuture replaced by ``value_of(future)``."""
    return replace(obj, _FUTURES, value_of)
