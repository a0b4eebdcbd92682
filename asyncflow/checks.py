"""What the engine checks about the backends it is given.

Each check runs once, when the engine is built or a task is declared, so that
a mistake (an object that is not an adapter, a task its backend cannot run, a
service its backend could not stop) is reported where it was made and names
what to change, instead of surfacing as a hang or a late failure.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

from .errors import TaskDefinitionError
from .protocol import Capability, ExecutionBackend
from .tasks import TaskKind

__all__ = [
    "Backends",
    "check_service",
    "named_backends",
    "protocol_gaps",
    "require",
]


#: the protocol's members and what each must be
_MEMBERS = (
    ("info", "attribute"),
    ("start", "async"),
    ("submit", "method"),
    ("cancel", "method"),
    ("shutdown", "async"),
)


def protocol_gaps(backend: object) -> list[str]:
    """What keeps ``backend`` from being an adapter, one phrase per member, so
    that its author learns which member to add or fix rather than a list of all
    five (isinstance on the Protocol only says yes or no, and not whether the
    methods that must be awaited are ``async``)."""
    gaps = []
    for member, kind in _MEMBERS:
        try:
            value = getattr(backend, member)
        except AttributeError:
            gaps.append(f"lacks {member}" + ("" if kind == "attribute" else "()"))
            continue
        if kind == "attribute":
            continue
        if not callable(value):
            gaps.append(f"{member} is a {type(value).__name__}, not a method")
        elif kind == "async" and _plainly_sync(value):
            gaps.append(f"{member}() is not async (the engine awaits it)")
    return gaps


def _plainly_sync(fn: Any) -> bool:
    """A plain ``def``: neither it nor what it wraps is a coroutine function.
    Other callables may return an awaitable; they get the benefit of the doubt."""
    if not (inspect.isfunction(fn) or inspect.ismethod(fn)):
        return False
    return not (
        inspect.iscoroutinefunction(fn)
        or inspect.iscoroutinefunction(inspect.unwrap(fn))
    )


Backends = (
    ExecutionBackend | Mapping[str, ExecutionBackend] | Sequence[ExecutionBackend]
)


def named_backends(backend: Backends | None, dry_run: bool) -> dict[str, Any]:
    """``{name: backend}`` from any form ``backend=`` takes."""
    if backend is None and not dry_run:
        from .registry import default_backend

        backend = default_backend()
    backends: dict[str, Any]
    if isinstance(backend, Mapping):
        backends = dict(backend)
    elif isinstance(backend, list | tuple):
        backends = _by_name(backend)
    elif backend is None:
        backends = {"default": None}
    else:
        backends = {"default": backend}
    if not backends:
        raise TaskDefinitionError(
            f"WorkflowEngine(backend={backend!r}) needs a backend"
        )
    if dry_run:
        from .adapters.noop import NoopExecutionBackend

        return {name: NoopExecutionBackend(name) for name in backends}
    return backends


def _by_name(backends: Sequence[Any]) -> dict[str, Any]:
    """Each backend under its own name, which must be unique: a list gives no
    other way to tell two apart."""
    named: dict[str, Any] = {}
    for b in backends:
        name = getattr(getattr(b, "info", None), "name", None) or repr(b)
        if name in named:
            raise TaskDefinitionError(
                f"two backends in backend=[...] are named {name!r}; pass a "
                "dict {name: backend} to name them yourself"
            )
        named[name] = b
    return named


def check_service(name: str, kind: TaskKind, backend: Any) -> None:
    """A service is stopped at shutdown, so its backend must be able to."""
    if backend is None:
        raise TaskDefinitionError(
            f"block {name!r}: service=True is for function and executable tasks"
        )
    function = kind is TaskKind.FUNCTION
    need = Capability.CANCEL_RUNNING if function else Capability.KILL_EXECUTABLES
    require(
        backend,
        need,
        f"service task {name!r}: backend {backend.info.name!r} could not stop it "
        "at shutdown ({why}); run it on a backend with "
        f"{need.value!r}, or make it an executable task",
    )


def require(backend: ExecutionBackend, need: Capability, message: str) -> None:
    """Refuse a declaration ``backend`` cannot honour; ``message`` may quote
    the backend's reason as ``{why}``."""
    caps = backend.info.capabilities
    if need not in caps:
        raise TaskDefinitionError(message.replace("{why}", caps.why_not(need)))
