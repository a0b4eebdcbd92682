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


class _State:
    """Per-run bookkeeping, kept on the config so in-process reruns start clean."""

    def __init__(self) -> None:
        self.seen: dict[str, type] = {}
        self.outcomes: dict[str, Counter[str]] = defaultdict(Counter)
        self.skips: dict[str, set[str]] = defaultdict(set)


_STATE = pytest.StashKey[_State]()


_current: _State | None = None


def pytest_configure(config: pytest.Config) -> None:
    global _current
    config.stash[_STATE] = _current = _State()


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
        seen = collector.config.stash[_STATE].seen
        seen[f"{obj.__module__}::{obj.__qualname__}"] = obj
        if not collector.classnamefilter(name):
            seen[f"{obj.__module__}::{obj.__qualname__}"] = _Uncollectable


class _Uncollectable:
    """Marks a class pytest will not collect because of its name."""


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(
    config: pytest.Config, items: list[pytest.Item]
) -> None:
    counts: Counter[type] = Counter()
    for item in items:
        cls = getattr(item, "cls", None)
        if cls is not None and issubclass(cls, BackendFixtures):
            counts[cls] += 1
    seen = config.stash[_STATE].seen
    empty = [key for key, cls in seen.items() if counts[cls] == 0]
    if empty:
        hint = ""
        if any(cls is _Uncollectable for cls in seen.values()):
            hint = " (a class is only collected if its name matches python_classes, "
            hint += "by default: starts with 'Test')"
        raise pytest.UsageError(
            "asyncflow conformance: these adapter classes collected zero tests; "
            "combine BackendFixtures with ConformanceSuite or its mixins: "
            + ", ".join(empty)
            + hint
        )


@pytest.hookimpl
def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    state = _current
    backend = dict(report.user_properties).get(USER_PROPERTY)
    if not isinstance(backend, str) or (report.when != "call" and not report.skipped):
        return
    if state is None:
        return
    state.outcomes[backend][report.outcome] += 1
    if report.skipped and isinstance(report.longrepr, tuple):
        state.skips[backend].add(str(report.longrepr[2]).removeprefix("Skipped: "))


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    state = config.stash[_STATE]
    if not state.outcomes:
        return
    terminalreporter.section("asyncflow conformance")
    for backend, counts in sorted(state.outcomes.items()):
        summary = ", ".join(f"{n} {outcome}" for outcome, n in sorted(counts.items()))
        terminalreporter.line(f"{backend}: {summary}")
        for reason in sorted(state.skips[backend]):
            terminalreporter.line(f"    skipped: {reason}")
