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

from .base import BackendFixtures, scenario
from .gate import Gate, gate_wait
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

__all__ = [
    "BackendFixtures",
    "BlockTests",
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
    "ShutdownTests",
    "TimeoutTests",
    "gate_wait",
    "scenario",
]


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
    ShutdownTests,
):
    """Every mixin at once: what an adapter claiming full conformance runs."""
