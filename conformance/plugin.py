"""pytest plugin shipped with asyncflow (entry point ``pytest11``).

It names the adapters under test with their runtime versions, and fails the run
loudly when a class built on :class:`BackendFixtures` collects no test at all, the
classic silent failure of abstract test bases.  It imports no runtime.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any

import pytest

from .base import USER_PROPERTY, BackendFixtures

_seen: dict[str, type] = {}
_outcomes: dict[str, Counter[str]] = defaultdict(Counter)
_skips: dict[str, set[str]] = defaultdict(set)


def pytest_report_header(config: pytest.Config) -> list[str]:
    from ..registry import available_backends

    parts = []
    for status in available_backends():
        if status.installed:
            parts.append(f"{status.name} {status.version or ''}".strip())
    return ["asyncflow backends installed: " + ", ".join(parts)]


@pytest.hookimpl(tryfirst=True)
def pytest_pycollect_makeitem(collector: Any, name: str, obj: object) -> None:
    if (
        isinstance(obj, type)
        and issubclass(obj, BackendFixtures)
        and not obj.__module__.startswith("asyncflow.conformance")
    ):
        _seen[f"{obj.__module__}::{obj.__qualname__}"] = obj
        if not collector.classnamefilter(name):
            raise pytest.UsageError(
                f"conformance class {obj.__qualname__} in {obj.__module__} is not "
                "collected by pytest: its name must match python_classes "
                "(start it with 'Test')"
            )


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    counts: Counter[type] = Counter()
    for item in items:
        cls = getattr(item, "cls", None)
        if cls is not None and issubclass(cls, BackendFixtures):
            counts[cls] += 1
    empty = [key for key, cls in _seen.items() if counts[cls] == 0]
    if empty:
        raise pytest.UsageError(
            "asyncflow conformance: these adapter classes collected zero tests; "
            "combine BackendFixtures with ConformanceSuite or its mixins: "
            + ", ".join(empty)
        )


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    backend = dict(report.user_properties).get(USER_PROPERTY)
    if backend is None or (report.when != "call" and not report.skipped):
        return
    _outcomes[backend][report.outcome] += 1
    if report.skipped and isinstance(report.longrepr, tuple):
        _skips[backend].add(str(report.longrepr[2]).removeprefix("Skipped: "))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _outcomes:
        return
    terminalreporter.section("asyncflow conformance")
    for backend, counts in sorted(_outcomes.items()):
        summary = ", ".join(f"{n} {outcome}" for outcome, n in sorted(counts.items()))
        terminalreporter.line(f"{backend}: {summary}")
        for reason in sorted(_skips[backend]):
            terminalreporter.line(f"    skipped: {reason}")
