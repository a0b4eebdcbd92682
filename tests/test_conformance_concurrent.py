"""The embedded default passes the whole conformance suite, on threads and on
processes."""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

import pytest

from asyncflow import ConcurrentExecutionBackend
from asyncflow.conformance import BackendFixtures, ConformanceSuite


class TestThreads(BackendFixtures, ConformanceSuite):
    @pytest.fixture
    def backend(self) -> ConcurrentExecutionBackend:
        return ConcurrentExecutionBackend(ThreadPoolExecutor(2))


class TestProcesses(BackendFixtures, ConformanceSuite):
    @pytest.fixture
    def backend(self) -> ConcurrentExecutionBackend:
        return ConcurrentExecutionBackend(ProcessPoolExecutor(2))
