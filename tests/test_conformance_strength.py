"""The conformance suite catches broken adapters: each mutant in
``tests/conformance_mutants`` fails the suite test written for its bug, for the
stated reason, while the correct adapter it was made from passes that test.

One pytester run in a subprocess holds every case (one test each, at bounds
lowered so that a hang fails in seconds), and its JUnit XML says how each ended.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tests.conformance_mutants import mutants

ROOT = Path(__file__).resolve().parent.parent

#: mutant -> (the suite test that must catch it, text its failure must show)
CAUGHT_BY = {
    "DoubleResult": ("test_each_task_reported_once", "result int after result"),
    "ErrorAfterResult": ("test_each_task_reported_once", "RuntimeError after"),
    "RunsPipedEarly": ("test_dependents_of_a_failure_never_run", "'grandchild'"),
    "ForgetsRefused": (
        "test_piped_task_whose_upstream_already_finished",
        "never reported",
    ),
    "LostAsRuntimeError": ("test_killed_worker_is_worker_lost", "RuntimeError"),
    "KeepsBrokenPool": ("test_killed_worker_is_worker_lost", "EngineClosedError"),
    "SlowFailureReport": ("test_failure_is_reported_promptly", "to be reported"),
    "BlockingSubmit": ("test_start_and_submit_never_block_the_loop", "stood still"),
    "BlockingStart": ("test_start_and_submit_never_block_the_loop", "stood still"),
    "WaitsForStuckWork": (
        "test_shutdown_returns_while_a_function_is_stuck",
        "shutdown() took over",
    ),
    "LeavesAProcess": (
        "test_shutdown_cancels_idempotent_and_closes",
        "`sleep 300` (parent",
    ),
    "ShutdownNeedsStart": ("test_shutdown_before_start", "before start()"),
    "ShutdownRaisesTwice": ("test_shutdown_twice_through_the_protocol", "already"),
    "ShutdownHangsTwice": ("test_shutdown_twice_through_the_protocol", "Timeout"),
    "SilentStart": ("test_start_of_a_task_is_reported", "no set_running"),
    "RunsCancelledQueued": ("test_cancelled_queued_task_never_runs", "ran anyway"),
    "IgnoresCancelRunning": (
        "test_cancelled_running_function_never_finishes",
        "still running",
    ),
}

#: correct adapters beyond the mutants' bases, and the test each must pass (run
#: first, before any case can have started the helper one of them relies on)
PASSES = {"UsesResourceTracker": "test_shutdown_cancels_idempotent_and_closes"}

#: correct adapters that cannot run a test (no capability for it) are left out
NO_CORRECT_TWIN = {"test_cancelled_running_function_never_finishes"}

FAST = {
    "failure_report_floor": 2.0,
    "shutdown_bound": 4.0,
    "stop_bound": 3.0,
    "task_bound": 10.0,
}

MODULE = f'''
import pytest
from asyncflow.conformance import BackendFixtures, ConformanceSuite
from tests.conformance_mutants import mutants


def case(adapter, test):
    """A class that runs one suite test on one adapter, at fast bounds."""

    @pytest.fixture(name="backend")
    def backend(self):
        return getattr(mutants, adapter)()

    body = {{"backend": backend, test: getattr(ConformanceSuite, test), **{FAST!r}}}
    return type("Case", (BackendFixtures,), body)
'''


def _cases() -> dict[str, tuple[str, str]]:
    """Test class name -> (adapter, suite test), mutants and correct twins."""
    cases = {f"Test{name}": (name, test) for name, test in PASSES.items()}
    for mutant, (test, _) in CAUGHT_BY.items():
        cases[f"Test{mutant}"] = (mutant, test)
        if test not in NO_CORRECT_TWIN:
            base = getattr(mutants, mutant).base
            cases[f"Test{base}_{test}"] = (base, test)
    return cases


def _outcomes(xml: Path) -> dict[str, tuple[str, str]]:
    """Test class name -> (passed/failure/error/skipped, message and text)."""
    out = {}
    for case in ET.parse(xml).iter("testcase"):
        cls = case.get("classname", "").rsplit(".", 1)[-1]
        outcome, text = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = child.tag
                text = f"{child.get('message', '')}\n{child.text or ''}"
        out[cls] = (outcome, text)
    return out


def test_every_mutant_fails_its_test_and_every_twin_passes(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    cases = _cases()
    lines = [f"{name} = case({a!r}, {t!r})" for name, (a, t) in cases.items()]
    pytester.makepyfile(test_mutants=MODULE + "\n".join(lines) + "\n")
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    xml = pytester.path / "out.xml"
    pytester.runpytest_subprocess(
        "-p",
        "no:cacheprovider",
        "--timeout=120",
        # pytest's own tracebacks re-parse source with ast, which CPython
        # 3.11.7 can fail mid-run ("AST constructor recursion depth mismatch")
        "--tb=native",
        f"--junitxml={xml}",
    )
    got = _outcomes(xml)
    wrong = []
    for name, (adapter, test) in cases.items():
        outcome, text = got.get(name, ("missing", ""))
        if adapter in CAUGHT_BY:
            expect = CAUGHT_BY[adapter][1]
            if outcome != "failure" or expect not in text:
                wrong.append(f"{adapter} not caught by {test} ({expect!r}): {text}")
        elif outcome != "passed":
            wrong.append(f"correct {adapter} {outcome} {test}: {text}")
    assert not wrong, "\n\n".join(wrong)
