"""Typed descriptions of work, as handed to a backend.

These are the only things that cross the protocol boundary besides results, so they
are small frozen dataclasses rather than dicts: an adapter author can read every
field's meaning here, and a typo is an ``AttributeError`` instead of a silent miss.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import TaskDefinitionError
from .output import DEFAULT, Capture

__all__ = ["Command", "Resources", "TaskSpec"]


@dataclass(frozen=True, slots=True)
class Resources:
    """What one task needs.  ``memory`` is in megabytes, as in Parsl and Slurm.

    ``ranks`` > 1 asks for an MPI launch (backends without MPI reject it).
    """

    cores: int = 1
    gpus: int = 0
    memory: int | None = None
    ranks: int = 1

    @classmethod
    def coerce(
        cls, value: Resources | Mapping[str, Any] | None, task: str
    ) -> Resources:
        if value is None:
            return DEFAULT_RESOURCES
        if isinstance(value, Resources):
            return value
        if not isinstance(value, Mapping):
            raise TaskDefinitionError(
                f"task {task!r}: resources= must be a dict such as "
                f"{{'cores': 2, 'gpus': 1, 'memory': 4096}}, got {type(value).__name__}"
            )
        unknown = set(value) - {"cores", "gpus", "memory", "ranks"}
        if unknown:
            raise TaskDefinitionError(
                f"task {task!r}: unknown resource key(s) {sorted(unknown)}; "
                "valid keys are cores, gpus, memory (MB) and ranks"
            )
        res = cls(**value)
        for name in ("cores", "gpus", "ranks"):
            n = getattr(res, name)
            if not isinstance(n, int) or n < (0 if name == "gpus" else 1):
                raise TaskDefinitionError(
                    f"task {task!r}: resources[{name!r}] must be a whole number "
                    f"{'>= 0' if name == 'gpus' else '>= 1'}, got {n!r}"
                )
        return res

    @property
    def is_default(self) -> bool:
        return self == DEFAULT_RESOURCES


DEFAULT_RESOURCES = Resources()


@dataclass(frozen=True, slots=True)
class Command:
    """A command line to run as a subprocess.

    A ``str`` ``argv`` runs through ``/bin/sh``; a tuple of strings runs without a
    shell, so shell metacharacters in it stay literal.  ``env`` is *added* to the
    worker's environment.  An executable task's body may return a ``Command`` to set
    ``env``/``cwd`` per call.
    """

    argv: str | tuple[str, ...]
    env: Mapping[str, str] | None = None
    cwd: str | None = None
    #: where and how its output is kept (:mod:`asyncflow.output`)
    capture: Capture = DEFAULT

    @property
    def shell(self) -> bool:
        return isinstance(self.argv, str)

    @classmethod
    def coerce(
        cls,
        value: object,
        task: str,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        capture: Capture = DEFAULT,
    ) -> Command:
        """Validate what an executable body returned, naming the task on error."""
        if isinstance(value, Command):
            env = {**(env or {}), **(value.env or {})} or None
            cwd = value.cwd or cwd
            value = value.argv
        argv = _argv(value, task)
        check_env(env, task)
        if cwd is not None:
            cwd = os.fspath(cwd)
        return cls(argv, env, cwd, capture)


def _argv(value: object, task: str) -> str | tuple[str, ...]:
    """The command an executable body returned, as ``Command.argv``."""
    if isinstance(value, str):
        if not value.strip():
            raise TaskDefinitionError(
                f"executable task {task!r} returned an empty command string"
            )
        return value
    if (
        isinstance(value, list | tuple)
        and value
        and all(isinstance(a, str) for a in value)
    ):
        return tuple(value)
    raise TaskDefinitionError(
        f"executable task {task!r} must return a command: a str (run by "
        f"/bin/sh) or a non-empty list[str] (run without a shell), got "
        f"{value!r} of type {type(value).__name__}"
    )


def check_env(env: object, task: str) -> None:
    if env is None:
        return
    if not isinstance(env, Mapping):
        raise TaskDefinitionError(
            f"task {task!r}: env= must be a dict of str to str, got "
            f"{type(env).__name__}"
        )
    bad = {
        k: v for k, v in env.items() if not (isinstance(k, str) and isinstance(v, str))
    }
    if bad:
        raise TaskDefinitionError(
            f"task {task!r}: env= values must be strings; convert these with str(): "
            + ", ".join(f"{k!r}={v!r}" for k, v in bad.items())
        )


@dataclass(slots=True)
class TaskSpec:
    """One attempt at one task, with its dependencies already resolved.

    Exactly one of ``function`` and ``command`` is set.  ``uid`` is unique per
    attempt (a retry gets a new one), so a late completion of an abandoned attempt
    can never be mistaken for the current one.  ``args``/``kwargs`` hold plain
    values, except that an upstream result this same backend produced as a
    :class:`~asyncflow.protocol.RemoteValue` is passed through as that object, so
    the adapter can hand the runtime its native reference instead of the data.

    ``timeout`` and ``attempt`` are the engine's: it times the task out (by
    calling the adapter's ``cancel``) and retries it (with a new spec).  An
    adapter may pass them on to the runtime's logs or limits, never act on them.
    """

    uid: str
    name: str
    function: Callable[..., Any] | None = None
    command: Command | None = None
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    resources: Resources = DEFAULT_RESOURCES
    timeout: float | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    attempt: int = 0
    is_async: bool = False
    has_remote_args: bool = False
    #: False: the task must travel alone, never in a chunk with others (see
    #: :mod:`asyncflow.adapters.toolkit.chunks`); adapters that do not chunk
    #: ignore it
    chunk: bool = True
