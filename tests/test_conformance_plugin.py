"""The conformance plugin fails loudly instead of silently collecting nothing."""

from __future__ import annotations

import pytest

HEADER = """
import pytest
from asyncflow import ConcurrentExecutionBackend
from asyncflow.conformance import BackendFixtures, ConformanceSuite, FunctionTests
"""


def test_adapter_class_without_mixins_is_an_error(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        HEADER
        + """
class TestForgotTheMixins(BackendFixtures):
    @pytest.fixture
    def backend(self):
        return ConcurrentExecutionBackend()
"""
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*collected zero tests*TestForgotTheMixins*"])


def test_uncollectable_class_name_is_an_error(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        HEADER
        + """
class MyAdapterSuite(BackendFixtures, ConformanceSuite):
    @pytest.fixture
    def backend(self):
        return ConcurrentExecutionBackend()
"""
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*zero tests*MyAdapterSuite*starts with*Test*"])


def test_missing_backend_fixture_override_fails(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        HEADER
        + """
class TestNoOverride(BackendFixtures, FunctionTests):
    pass
"""
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-x")
    assert result.ret != pytest.ExitCode.OK
    result.stdout.fnmatch_lines(["*must override the `backend` fixture*"])


def test_header_and_summary_name_the_adapter(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        HEADER
        + """
class TestThreads(BackendFixtures, FunctionTests):
    @pytest.fixture
    def backend(self):
        return ConcurrentExecutionBackend()
"""
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=4)
    result.stdout.fnmatch_lines(
        [
            "asyncflow backends installed: threads*",
            "*asyncflow conformance*",
            "concurrent-threads (concurrent.futures.ThreadPoolExecutor *): 4 passed",
        ]
    )
