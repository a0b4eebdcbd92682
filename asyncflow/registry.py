"""Finding backends by name: the ``asyncflow.backends`` entry-point group.

The in-tree adapters register there like anyone else's.  ``ADAPTERS`` adds what
an entry point cannot say: which module must import for the runtime to count as
installed, which extra installs it, whether it takes an HPC allocation, and
what ``asyncflow bench`` compares it with.
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import importlib.util
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import BackendNotInstalledError, TaskDefinitionError

__all__ = [
    "ADAPTERS",
    "Adapter",
    "BackendStatus",
    "available_backends",
    "default_backend",
    "load_backend",
]

GROUP = "asyncflow.backends"


@dataclass(frozen=True)
class Adapter:
    """One in-tree adapter: what its entry point cannot say, and what the
    command line and ``asyncflow bench`` need to know of it.

    ``runtime`` is the module that must import for the runtime to count as
    installed, and the distribution whose version is shown (None: built in,
    nothing beyond asyncflow); ``extra`` the pyproject extra installing it.
    ``batch`` marks
    backends that take the reference page's HPC allocation dict
    (``{'resource': 'slurm', 'queue': ..., 'nodes': ...}``) as first argument.
    ``baseline`` is what the bench compares the backend with: the runtime's own
    API doing the same work, a :class:`asyncflow.bench.raw.Raw` named by import
    path so that listing backends imports no bench code.
    """

    name: str
    target: str
    baseline: str
    runtime: str | None = None
    extra: str | None = None
    batch: bool = False

    @property
    def install_hint(self) -> str:
        return f"pip install 'asyncflow[{self.extra}]'" if self.extra else "built in"


#: every in-tree adapter, in the order listings and bench tables show them;
#: pyproject.toml's entry points and extras agree (tests/test_registry_table.py)
ADAPTERS: dict[str, Adapter] = {
    a.name: a
    for a in (
        Adapter(
            "threads",
            "asyncflow.adapters.concurrent:ConcurrentExecutionBackend",
            baseline="asyncflow.bench.raw:ThreadsRaw",
        ),
        Adapter(
            "processes",
            "asyncflow.adapters.concurrent:process_backend",
            baseline="asyncflow.bench.raw:ProcessesRaw",
        ),
        Adapter(
            "dask",
            "asyncflow.adapters.dask:DaskExecutionBackend",
            baseline="asyncflow.bench.raw:DaskRaw",
            runtime="distributed",
            extra="dask",
            batch=True,
        ),
        Adapter(
            "ray",
            "asyncflow.adapters.ray:RayExecutionBackend",
            baseline="asyncflow.bench.raw:RayRaw",
            runtime="ray",
            extra="ray",
        ),
        Adapter(
            "parsl",
            "asyncflow.adapters.parsl:ParslExecutionBackend",
            baseline="asyncflow.bench.raw:ParslRaw",
            runtime="parsl",
            extra="parsl",
            batch=True,
        ),
        Adapter(
            "radical",
            "asyncflow.adapters.radical:RadicalExecutionBackend",
            baseline="asyncflow.bench.rawrp:RadicalRaw",
            runtime="radical.pilot",
            extra="radical",
            batch=True,
        ),
    )
}

#: in-tree backends that take the HPC allocation dict
BATCH = frozenset(a.name for a in ADAPTERS.values() if a.batch)


def batch_names() -> str:
    """``'dask, parsl and radical'``: help texts name the batch backends from
    the table, so that they never list one the table does not mark."""
    *rest, last = [a.name for a in ADAPTERS.values() if a.batch]
    return f"{', '.join(rest)} and {last}" if rest else last


@dataclass(frozen=True)
class BackendStatus:
    name: str
    target: str
    installed: bool
    version: str | None
    install_hint: str


def _registered() -> dict[str, tuple[str, str | None]]:
    """name -> (import path, version of the distribution that registered it).

    The version comes from the entry point's own distribution, so an adapter
    installed from any package shows its version, not only the in-tree ones.
    """
    found: dict[str, tuple[str, str | None]] = {
        name: (adapter.target, None) for name, adapter in ADAPTERS.items()
    }
    for ep in md.entry_points(group=GROUP):
        dist = ep.dist
        found[ep.name] = (ep.value, dist.version if dist is not None else None)
    return found


def _entry_points() -> dict[str, str]:
    return {name: target for name, (target, _) in _registered().items()}


def available_backends() -> list[BackendStatus]:
    """Every backend name asyncflow knows of, with whether it can run here.

    ``version`` is the runtime's when it is a distribution of its own (Dask,
    Ray, ...), else that of the distribution providing the adapter."""
    out = []
    for name, (target, provider_version) in _registered().items():
        adapter = ADAPTERS.get(name)
        runtime = adapter.runtime if adapter else None
        hint = adapter.install_hint if adapter else ""
        if runtime is None:
            installed = _importable(target.partition(":")[0])
            version = provider_version if installed else None
        else:
            installed = _importable(runtime)
            version = _version(runtime) if installed else None
        out.append(
            BackendStatus(
                name,
                target,
                installed,
                version,
                hint or f"install the package providing {target}",
            )
        )
    return out


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def _resolve(target: str) -> Callable[..., Any]:
    module, _, attr = target.partition(":")
    obj: Any = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def backend_class(name: str) -> Callable[..., Any]:
    targets = _entry_points()
    if name not in targets:
        raise TaskDefinitionError(
            f"unknown backend {name!r}; known backends: {', '.join(sorted(targets))}"
        )
    try:
        return _resolve(targets[name])
    except ImportError as exc:
        if not _missing_runtime(exc):
            raise  # a broken adapter, not a missing runtime: show the real error
        adapter = ADAPTERS.get(name)
        hint = adapter.install_hint if adapter else ""
        raise BackendNotInstalledError(
            f"backend {name!r} needs a runtime that is not installed "
            f"({exc.name or exc})"
            f"; install it with: {hint or 'pip install the adapter package'}"
        ) from exc


def _missing_runtime(exc: ImportError) -> bool:
    """Whether ``exc`` says a third-party module is absent (so the install hint
    helps), rather than that asyncflow's own code failed to import."""
    missing = exc.name or ""
    return isinstance(exc, ModuleNotFoundError) and not (
        missing == "asyncflow" or missing.startswith("asyncflow.")
    )


def missing_backend_class(cls_name: str, error: BackendNotInstalledError) -> type:
    """A class named ``cls_name`` whose construction raises ``error`` again.

    ``from asyncflow import RadicalExecutionBackend`` heads radical.asyncflow
    scripts moved over by their imports, including scripts that pick another
    backend at run time; the import must succeed where radical.pilot is absent,
    and the install hint comes when the class is used.
    """
    from .adapters._awaitable import AwaitableBackend

    message = str(error)
    cause = error.__cause__

    def refuse(cls: type, *args: Any, **kwargs: Any) -> Any:
        raise BackendNotInstalledError(message) from cause

    return type(
        cls_name,
        (AwaitableBackend,),
        {
            "__new__": refuse,
            "__module__": "asyncflow",
            "__qualname__": cls_name,
            "__doc__": f"Not available here: {message}",
        },
    )


def capabilities_of(name: str) -> Any:
    """A backend's class-level ``CAPABILITIES``, without starting its runtime."""
    try:
        return getattr(backend_class(name), "CAPABILITIES", None)
    except Exception:
        return None


def load_backend(name: str, *args: Any, **options: Any) -> Any:
    """Instantiate the backend registered as ``name`` with ``options``."""
    return backend_class(name)(*args, **options)


def _json_object(var: str, example: str) -> dict[str, Any]:
    raw = os.environ.get(var, "").strip()
    try:
        value = json.loads(raw) if raw else {}
    except json.JSONDecodeError as exc:
        raise TaskDefinitionError(
            f"{var} is not valid JSON ({exc}); use e.g. '{example}'"
        ) from None
    if not isinstance(value, dict):
        raise TaskDefinitionError(f"{var} must be a JSON object, e.g. '{example}'")
    return value


def default_backend() -> Any:
    """``$ASYNCFLOW_BACKEND`` (with ``$ASYNCFLOW_BACKEND_OPTIONS`` as JSON), else
    a thread pool; ``$ASYNCFLOW_HPC``, the page's allocation dict as JSON, is
    handed to a batch-capable backend, so that a script moves to a cluster
    without an edit."""
    name = os.environ.get("ASYNCFLOW_BACKEND", "").strip() or "threads"
    options = _json_object("ASYNCFLOW_BACKEND_OPTIONS", '{"n_workers": 2}')
    allocation = _json_object("ASYNCFLOW_HPC", '{"resource": "slurm", "nodes": 2}')
    if not allocation:
        return load_backend(name, **options)
    if name in ADAPTERS and name not in BATCH:
        raise TaskDefinitionError(
            f"backend {name!r} takes no HPC allocation (ASYNCFLOW_HPC / --hpc); "
            f"use one of {', '.join(sorted(BATCH))}, or start Ray in a batch job "
            "and attach with --backend-option address=HOST:6379"
        )
    return load_backend(name, allocation, **options)
