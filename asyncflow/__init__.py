"""asyncflow: one asyncio workflow, five runtimes.

The runtime adapters other than the embedded default are imported on first use,
so ``import asyncflow`` stays fast and needs none of the optional runtimes.  Where
a runtime is missing, its backend's name still imports: it names a class whose
construction raises BackendNotInstalledError with the install hint.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .adapters.concurrent import ConcurrentExecutionBackend, LocalExecutionBackend
from .adapters.noop import NoopExecutionBackend
from .data import InputFile, OutputFile
from .engine import WorkflowEngine
from .errors import (
    AsyncflowError,
    BackendError,
    BackendNotInstalledError,
    BackendStartError,
    DependencyFailureError,
    EngineClosedError,
    ExecutableFailedError,
    OutputDecodeError,
    ResourceUnavailableError,
    SerializationError,
    TaskDefinitionError,
    TaskInterruptedError,
    TaskTimeoutError,
    WorkerLostError,
)
from .future import TaskFuture, TaskState
from .output import StdoutFile
from .protocol import (
    BackendInfo,
    Capabilities,
    Capability,
    CompletionSink,
    ExecutionBackend,
    RemoteValue,
)
from .registry import ADAPTERS as _ADAPTERS
from .registry import available_backends, load_backend
from .spec import Command, Resources, TaskSpec

if TYPE_CHECKING:
    from .adapters.dask import DaskExecutionBackend
    from .adapters.parsl import ParslExecutionBackend
    from .adapters.radical import RadicalExecutionBackend
    from .adapters.ray import RayExecutionBackend

__version__ = "0.1.0"

__all__ = [
    "AsyncflowError",
    "BackendError",
    "BackendInfo",
    "BackendNotInstalledError",
    "BackendStartError",
    "Capabilities",
    "Capability",
    "Command",
    "CompletionSink",
    "ConcurrentExecutionBackend",
    "DaskExecutionBackend",
    "DependencyFailureError",
    "EngineClosedError",
    "ExecutableFailedError",
    "ExecutionBackend",
    "InputFile",
    "LocalExecutionBackend",
    "NoopExecutionBackend",
    "OutputDecodeError",
    "OutputFile",
    "ParslExecutionBackend",
    "RadicalExecutionBackend",
    "RayExecutionBackend",
    "RemoteValue",
    "ResourceUnavailableError",
    "Resources",
    "SerializationError",
    "StdoutFile",
    "TaskDefinitionError",
    "TaskFuture",
    "TaskInterruptedError",
    "TaskSpec",
    "TaskState",
    "TaskTimeoutError",
    "WorkerLostError",
    "WorkflowEngine",
    "available_backends",
    "load_backend",
]

#: class name -> backend name, for the adapters whose runtime is optional
_LAZY = {
    adapter.target.rpartition(":")[2]: name
    for name, adapter in _ADAPTERS.items()
    if adapter.runtime is not None
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from .registry import backend_class, missing_backend_class

        try:
            cls = backend_class(_LAZY[name])
        except BackendNotInstalledError as exc:
            cls = missing_backend_class(name, exc)
        globals()[name] = cls
        return cls
    raise AttributeError(f"module 'asyncflow' has no attribute {name!r}")
