"""The conformance suite: proof that an adapter keeps the protocol's promises.

Combine the mixins you want with :class:`BackendFixtures` and override its
``backend`` fixture (the fsspec abstract-tests pattern)::

    from asyncflow.conformance import BackendFixtures, ConformanceSuite

    class TestMyBackend(BackendFixtures, ConformanceSuite):
        @pytest.fixture
        def backend(self):
            return MyBackend()

Tests for capabilities the adapter does not declare are skipped with the
adapter's reason.  The bundled pytest plugin prints each adapter under test with
its runtime version, and fails the run if an adapter class collects no tests.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from .base import BackendFixtures, Bounds, scenario
from .gate import Gate, gate_wait

# The mixins import psutil and the test tasks; they load on first use, so that
# pytest loading this package's plugin in any project imports none of it.
_LAZY = {
    "BlockTests": "suite_core",
    "DependencyTests": "suite_core",
    "FailureTests": "suite_core",
    "FunctionTests": "suite_core",
    "PipelineTests": "suite_pipeline",
    "CancelTests": "suite_runtime",
    "ExecutableTests": "suite_runtime",
    "ParallelTests": "suite_runtime",
    "PayloadTests": "suite_runtime",
    "ResourceTests": "suite_runtime",
    "RetryTests": "suite_runtime",
    "SerializationTests": "suite_runtime",
    "ServiceTests": "suite_services",
    "ShutdownTests": "suite_runtime",
    "TimeoutTests": "suite_runtime",
}

#: ConformanceSuite's bases, in MRO order (keep the TYPE_CHECKING copy in step)
_SUITE = (
    "FunctionTests",
    "DependencyTests",
    "FailureTests",
    "BlockTests",
    "ExecutableTests",
    "CancelTests",
    "TimeoutTests",
    "RetryTests",
    "ParallelTests",
    "PayloadTests",
    "PipelineTests",
    "SerializationTests",
    "ResourceTests",
    "ServiceTests",
    "ShutdownTests",
)

__all__ = [
    "BackendFixtures",
    "BlockTests",
    "Bounds",
    "CancelTests",
    "ConformanceSuite",
    "DependencyTests",
    "ExecutableTests",
    "FailureTests",
    "FunctionTests",
    "Gate",
    "ParallelTests",
    "PayloadTests",
    "PipelineTests",
    "ResourceTests",
    "RetryTests",
    "SerializationTests",
    "ServiceTests",
    "ShutdownTests",
    "TimeoutTests",
    "gate_wait",
    "scenario",
]

_SUITE_DOC = "Every mixin at once: what an adapter claiming full conformance runs."


def __getattr__(name: str) -> Any:
    if name == "ConformanceSuite":
        value: Any = type(
            name,
            tuple(__getattr__(base) for base in _SUITE),
            {"__doc__": _SUITE_DOC, "__module__": __name__, "__qualname__": name},
        )
    elif name in _LAZY:
        value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


if TYPE_CHECKING:
    from .suite_core import BlockTests, DependencyTests, FailureTests, FunctionTests
    from .suite_pipeline import PipelineTests
    from .suite_runtime import (
        CancelTests,
        ExecutableTests,
        ParallelTests,
        PayloadTests,
        ResourceTests,
        RetryTests,
        SerializationTests,
        ShutdownTests,
        TimeoutTests,
    )
    from .suite_services import ServiceTests

    class ConformanceSuite(
        FunctionTests,
        DependencyTests,
        FailureTests,
        BlockTests,
        ExecutableTests,
        CancelTests,
        TimeoutTests,
        RetryTests,
        ParallelTests,
        PayloadTests,
        PipelineTests,
        SerializationTests,
        ResourceTests,
        ServiceTests,
        ShutdownTests,
    ):
        """Every mixin at once: what an adapter claiming full conformance runs."""
