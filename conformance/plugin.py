"""pytest plugin shipped with asyncflow (entry point ``pytest11``).

It names the adapters under test with their runtime versions, and fails the run
loudly when a selected class built on :class:`BackendFixtures` collects no test
at all, the classic silent failure of abstract test bases.

pytest loads it in every project of an environment where asyncflow is installed,
so it must stay inert there: at start-up it imports only pytest and the standard
library (the suite needs psutil and a runtime, which a plain ``pip install
asyncflow`` does not bring), prints nothing and changes no outcome.  It notices
conformance classes through ``sys.modules``: a class can only derive from
:class:`BackendFixtures` once a test module imported it.
"""

from __future__ import annotations

import sys
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

_BASE = __name__.rpartition(".")[0] + ".base"
_SUITE_PREFIX = __name__.rpartition(".")[0]


def _fixtures_class() -> type | None:
    """``BackendFixtures`` if a test module imported the suite, else ``None``."""
    return getattr(sys.modules.get(_BASE), "BackendFixtures", None)


def _user_property() -> str | None:
    return getattr(sys.modules.get(_BASE), "USER_PROPERTY", None)


@dataclass
class _Candidate:
    """A class derived from BackendFixtures, found in a collected module."""

    cls: type
    parent: pytest.Collector  # the module (or class) it was found in
    name: str
    collectable: bool  # its name matches python_classes


class _State:
    """Per-run bookkeeping, kept on the config so in-process reruns start clean."""

    def __init__(self) -> None:
        self.candidates: dict[str, _Candidate] = {}
        #: classes whose collector pytest ran: selected by the command line
        self.expanded: dict[type, pytest.Collector] = {}
        #: tests per class before any deselection, and those deselected
        self.collected: Counter[type] = Counter()
        self.deselected: Counter[type] = Counter()
        self.outcomes: dict[str, Counter[str]] = defaultdict(Counter)
        self.skips: dict[str, set[str]] = defaultdict(set)


_STATE = pytest.StashKey[_State]()


#: the states of the runs in progress, innermost last: a test run in-process
#: by pytester must not leave its state behind for the outer run's reports
_runs: list[_State] = []


def _current() -> _State | None:
    return _runs[-1] if _runs else None


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_STATE] = state = _State()
    _runs.append(state)


def pytest_unconfigure(config: pytest.Config) -> None:
    state = config.stash.get(_STATE, None)
    if state in _runs:
        _runs.remove(state)


def _adapter_class(obj: object) -> type | None:
    """``obj`` if it is an adapter author's class built on BackendFixtures."""
    fixtures = _fixtures_class()
    if (
        fixtures is not None
        and isinstance(obj, type)
        and issubclass(obj, fixtures)
        and not obj.__module__.startswith(_SUITE_PREFIX)
    ):
        return obj
    return None


@pytest.hookimpl(tryfirst=True)
def pytest_pycollect_makeitem(collector: Any, name: str, obj: object) -> None:
    cls = _adapter_class(obj)
    if cls is None:
        return
    key = f"{cls.__module__}::{cls.__qualname__}"
    collectable = bool(collector.classnamefilter(name))
    collector.config.stash[_STATE].candidates.setdefault(
        key, _Candidate(cls, collector, name, collectable)
    )


def pytest_collectstart(collector: pytest.Collector) -> None:
    # pytest runs a class's collector only if the command line selects it (a
    # node id naming another class of the same module does not)
    if isinstance(collector, pytest.Class):
        cls = _adapter_class(collector.obj)
        if cls is not None:
            collector.config.stash[_STATE].expanded[cls] = collector


def _classes(items: list[pytest.Item]) -> Counter[type]:
    counts: Counter[type] = Counter()
    for item in items:
        cls = _adapter_class(getattr(item, "cls", None))
        if cls is not None:
            counts[cls] += 1
    return counts


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(
    config: pytest.Config, items: list[pytest.Item]
) -> None:
    # before -k, -m and --deselect remove items (they run later, untagged)
    config.stash[_STATE].collected.update(_classes(items))


def pytest_deselected(items: list[pytest.Item]) -> None:
    if items:
        items[0].config.stash[_STATE].deselected.update(_classes(items))


def _whole_module_requested(path: Path, config: pytest.Config) -> bool:
    """Whether an argument names this module (or a folder holding it) without
    node ids: only then are classes pytest cannot collect part of the run."""
    root = config.invocation_params.dir
    for arg in config.args:
        target, sep, _ = arg.partition("::")
        where = (root / target).resolve()
        if not where.exists():
            return True  # --pyargs or the like: cannot tell, so judge it
        if not sep and (where == path or where in path.parents):
            return True
    return False


def _wanted_by_expressions(node: pytest.Collector, config: pytest.Config) -> bool:
    """Whether ``-k`` and ``-m`` would keep a test of this class.

    A class with no test gives them nothing to deselect, so ask pytest's own
    matchers about the class node.  They are not public API: should they move,
    judge the class, the side that never lets a suite pass silently.
    """
    keyword = (config.option.keyword or "").strip()
    markexpr = (config.option.markexpr or "").strip()
    if not keyword and not markexpr:
        return True
    try:
        from _pytest.mark import KeywordMatcher, MarkMatcher
        from _pytest.mark.expression import Expression

        if keyword and not Expression.compile(keyword).evaluate(
            KeywordMatcher.from_item(node)  # type: ignore[arg-type]
        ):
            return False
        if markexpr and not Expression.compile(markexpr).evaluate(
            MarkMatcher.from_markers(node.iter_markers())
        ):
            return False
    except Exception:
        return True
    return True


def _selected(candidate: _Candidate, state: _State, config: pytest.Config) -> bool:
    node = state.expanded.get(candidate.cls)
    if node is None:
        if candidate.collectable:
            return False  # a node id or deselection left it out
        if not _whole_module_requested(candidate.parent.path, config):
            return False
        try:
            node = pytest.Class.from_parent(
                candidate.parent, name=candidate.name, obj=candidate.cls
            )
        except Exception:
            return True
    return _wanted_by_expressions(node, config)


def pytest_collection_finish(session: pytest.Session) -> None:
    state = session.config.stash[_STATE]
    if not state.candidates:
        return
    kept = _classes(session.items)
    empty = []
    for cand in state.candidates.values():
        cls = cand.cls
        total = max(state.collected[cls], kept[cls] + state.deselected[cls])
        if total == 0 and _selected(cand, state, session.config):
            empty.append(cand)
    if empty:
        hint = ""
        if any(not cand.collectable for cand in empty):
            hint = " (a class is only collected if its name matches python_classes, "
            hint += "by default: starts with 'Test')"
        names = [f"{c.cls.__module__}::{c.cls.__qualname__}" for c in empty]
        raise pytest.UsageError(
            "asyncflow conformance: these adapter classes collected zero tests; "
            "combine BackendFixtures with ConformanceSuite or its mixins: "
            + ", ".join(names)
            + hint
        )


def pytest_report_collectionfinish(
    config: pytest.Config, items: list[pytest.Item]
) -> list[str]:
    """The installed backends, only when adapters are under test: finding them
    imports adapter packages, which an unrelated project should not pay for."""
    if not _classes(items):
        return []
    from ..registry import available_backends

    parts = []
    for status in available_backends():
        if status.installed:
            parts.append(f"{status.name} {status.version or ''}".strip())
    return ["asyncflow backends installed: " + ", ".join(parts)]


@pytest.hookimpl
def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    state = _current()
    prop = _user_property()
    if state is None or prop is None:
        return
    backend = dict(report.user_properties).get(prop)
    if not isinstance(backend, str) or (report.when != "call" and not report.skipped):
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
