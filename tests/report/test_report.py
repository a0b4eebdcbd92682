"""The run report (``flow.export_report``, ``asyncflow run --report``), opened
in a real headless Chromium: it loads offline with no console error, shows
every task and what failed and why, is not blank, stays usable at 10,000
tasks, and is written however the run ends."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from asyncflow import AsyncflowError, ConcurrentExecutionBackend, WorkflowEngine
from asyncflow.report_html import report_data
from tests.browser import Browser, Page, distinct_colours

pytestmark = pytest.mark.timeout(120)

READY = "document.body.dataset.ready === '1'"


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with Browser() as started:
        yield started


def threads() -> ConcurrentExecutionBackend:
    return ConcurrentExecutionBackend(ThreadPoolExecutor(4))


async def mixed(flow: WorkflowEngine, tasks: int) -> None:
    """``tasks`` tasks: load/square pairs, a fan-in, one task that fails
    (``bad``) and one never run because of it (``after``)."""

    @flow.function_task
    def load(x: int) -> int:
        return x

    @flow.function_task
    def square(x: int) -> int:
        return x * x

    @flow.function_task
    def total(*xs: int) -> int:
        return sum(xs)

    @flow.function_task
    def bad(x: int) -> None:
        raise ValueError(f"bad input {x} <b>not bold</b>")

    @flow.function_task
    def after(x: int) -> int:
        return x

    pairs = (tasks - 3) // 2
    loads = [load(i) for i in range(tasks - 3 - pairs)]
    squares = [square(x) for x in loads[:pairs]]
    failed = bad(squares[0])
    await asyncio.gather(
        total(*squares, *loads[pairs:]), failed, after(failed), return_exceptions=True
    )


def run(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """``asyncio.run(main())`` in a thread of its own: while the browser is
    open, Playwright's event loop runs in this one."""
    with ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, main()).result()


def write(path: Path, tasks: int) -> Path:
    async def main() -> None:
        async with WorkflowEngine(backend=threads()) as flow:
            flow.record_trace()
            await mixed(flow, tasks)
            flow.export_report(str(path))

    run(main)
    return path


def opened(browser: Browser, path: Path, timeout: float = 30) -> Page:
    page = browser.open(path, ready=READY, timeout=timeout)
    assert not page.errors, page.errors
    assert not page.blocked, f"the report fetched {page.blocked}"
    return page


def dataset(page: Page, selector: str) -> dict[str, str]:
    found: dict[str, str] = page.evaluate(
        f"({{...document.querySelector({json.dumps(selector)}).dataset}})"
    )
    return found


@pytest.mark.timeout(90)
def test_report_shows_every_task_and_what_failed(
    browser: Browser, tmp_path: Path
) -> None:
    path = write(tmp_path / "run.html", 101)
    page = opened(browser, path)
    summary = dataset(page, "#summary")
    assert summary["tasks"] == "101"
    assert (summary["failed"], summary["done"]) == ("2", "99")
    dag = dataset(page, "#dag")
    assert (dag["mode"], dag["nodes"], dag["tasksShown"]) == ("tasks", "101", "101")
    assert dataset(page, "#timeline")["bars"] == "100"  # `after` never ran
    message = page.raw.get_by_text("ValueError: bad input 0 <b>not bold</b>").first
    assert message.is_visible()
    row = page.raw.locator("tr.failed-task[data-uid^='after.']")
    assert re.search(r"bad\.\d+: ValueError: bad input 0", row.inner_text())
    assert page.evaluate("document.querySelectorAll('#dag .node.crit').length") >= 3
    (utilisation,) = page.evaluate(
        "[...document.querySelectorAll('#utilisation tr[data-backend]')]"
        ".map((r) => +r.dataset.utilisation)"
    )
    assert 0 < utilisation <= 1
    png = page.screenshot(tmp_path / "run.png", full_page=True)
    assert distinct_colours(png) > 64
    page.raw.click("#dag .node[data-uid^='after.']")
    details = page.raw.locator("#details").inner_text()
    assert re.search(r"root cause\s+bad\.\d+: ValueError: bad input 0", details)


@pytest.mark.timeout(180)
def test_ten_thousand_tasks_stay_usable(browser: Browser, tmp_path: Path) -> None:
    path = write(tmp_path / "big.html", 10_000)
    assert path.stat().st_size < 2_000_000
    page = opened(browser, path, timeout=60)
    assert page.load_seconds < 30  # a functional bound, not a benchmark
    assert dataset(page, "#summary")["tasks"] == "10000"
    dag = dataset(page, "#dag")
    assert (dag["mode"], dag["tasksShown"]) == ("grouped", "10000")
    assert int(dag["nodes"]) == 5  # one per task name
    assert page.evaluate("document.querySelectorAll('svg *').length") < 200
    assert dataset(page, "#timeline")["bars"] == "9999"  # all but `after`
    assert distinct_colours(page.screenshot()) > 64


@pytest.mark.timeout(60)
def test_report_of_a_run_stopped_halfway_shows_pending_tasks(
    browser: Browser, tmp_path: Path
) -> None:
    path = tmp_path / "halfway.html"
    started, gate = threading.Event(), threading.Event()

    def slow() -> bool:
        started.set()
        return gate.wait(30)

    async def main() -> None:
        flow = WorkflowEngine(backend=threads())
        flow.record_trace()
        ok = flow.function_task(lambda x=None: 1)
        await ok()
        waiting = ok(flow.function_task(slow)())
        try:
            await asyncio.to_thread(started.wait, 30)
            await asyncio.sleep(0.1)  # its RUNNING event reaches the loop
            raise RuntimeError("the workflow gave up")
        finally:
            flow.export_report(str(path))
            gate.set()
            await waiting
            await flow.shutdown()

    with pytest.raises(RuntimeError):
        run(main)
    summary = dataset(opened(browser, path), "#summary")
    assert (summary["done"], summary["running"], summary["pending"]) == ("1", "1", "1")


def test_export_report_needs_a_recorded_trace(tmp_path: Path) -> None:
    async def main() -> None:
        async with WorkflowEngine(backend=threads()) as flow:
            with pytest.raises(AsyncflowError, match="--report"):
                flow.export_report(str(tmp_path / "r.html"))

    run(main)


def test_root_causes_and_critical_path_from_the_records() -> None:
    records = {}

    def record(uid: str, deps: tuple[str, ...], ran: float, error: str = "") -> None:
        start = 10.0 + len(records)
        rec = records[uid] = _Record(uid, uid, "b", deps, start, start, start + ran)
        rec.state, rec.error = ("failed", error) if error else ("done", "")
        if error.startswith("DependencyFailureError"):
            rec.running = rec.ran_until = None  # never ran

    record("a", (), 1.0)
    record("b", ("a",), 5.0)
    record("c", ("a",), 0.5)
    record("x", ("c",), 0.1, "ValueError: x")
    record("y", ("x", "b"), 0.0, "DependencyFailureError: y")
    record("z", ("y",), 0.0, "DependencyFailureError: z")
    data = report_data([_Recorder(records)], now=100.0)
    uids = data["tasks"]["uid"]
    assert [uids[i] for i in data["critical"]] == ["a", "b", "y", "z"]
    assert {uids[int(i)]: uids[r] for i, r in data["roots"].items()} == {
        "y": "x",
        "z": "x",
    }
    assert data["critical_ms"] == pytest.approx(6000.0)


class _Record:
    """A trace record as :class:`asyncflow.events.TraceRecorder` keeps one."""

    def __init__(
        self, uid: str, name: str, backend: str, deps: tuple[str, ...], *t: float
    ) -> None:
        self.uid, self.name, self.backend, self.deps = uid, name, backend, deps
        self.created, self.submitted = t[0], t[0]
        self.running: float | None = t[1]
        self.end, self.ran_until = t[2], t[2]
        self.state, self.attempts, self.worker, self.error = "done", 1, "w1", ""


class _Recorder:
    def __init__(self, records: dict[str, Any]) -> None:
        self.records = records


SCRIPT = textwrap.dedent("""
    import asyncio, signal, sys
    from asyncflow import WorkflowEngine

    # as in a terminal, even if the test runs where SIGINT is ignored
    signal.signal(signal.SIGINT, signal.default_int_handler)

    async def main():
        flow = WorkflowEngine()

        @flow.function_task
        def square(x):
            return x * x

        @flow.function_task
        def boom(x):
            raise KeyError("no such sample")

        @flow.executable_task
        def sleeper():
            return ["sleep", "30"]

        await asyncio.gather(*[square(i) for i in range(5)])
        failed = boom(1)
        stuck = [square(failed) for _ in range(2)]
        held = square(sleeper())  # still running or waiting when the script ends
        await asyncio.sleep(0.2)
        print("ready", flush=True)
        ending = sys.argv[1]
        if ending == "interrupt":
            await asyncio.sleep(60)  # where Ctrl-C finds it
        if ending == "raise":
            raise RuntimeError("the script gave up")
        await asyncio.gather(*stuck, return_exceptions=True)
        held.cancel()
        await flow.shutdown()

    asyncio.run(main())
""")


def asyncflow_run(
    tmp_path: Path, ending: str, report: Path | None = None
) -> tuple[int, str, Path]:
    """Run the script to its ``ending``; "interrupt" is a real SIGINT, sent
    once the script's tasks are under way."""
    (tmp_path / "wf.py").write_text(SCRIPT)
    report = report or tmp_path / f"{ending}.html"
    argv = ["-m", "asyncflow", "run", "--report", str(report), "wf.py", ending]
    with subprocess.Popen(
        [sys.executable, *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "ASYNCFLOW_BACKEND": "threads"},
    ) as proc:
        assert proc.stdout is not None
        ready = proc.stdout.readline()
        if ending == "interrupt" and ready == "ready\n":
            proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    return proc.returncode, stderr, report


@pytest.mark.timeout(150)
@pytest.mark.parametrize(
    ("ending", "code", "note"),
    [
        ("finish", 0, "the script finished"),
        ("raise", 1, "the script raised RuntimeError: the script gave up"),
        ("interrupt", 130, "interrupted (Ctrl-C)"),
    ],
)
def test_asyncflow_run_writes_the_report_however_the_script_ends(
    browser: Browser, tmp_path: Path, ending: str, code: int, note: str
) -> None:
    started = time.monotonic()
    returncode, stderr, report = asyncflow_run(tmp_path, ending)
    assert returncode == code, stderr
    assert f"report of 1 engine(s) written to {report}" in stderr
    assert time.monotonic() - started < 60
    page = opened(browser, report)
    assert page.evaluate("document.getElementById('note').textContent").startswith(note)
    summary = dataset(page, "#summary")
    assert summary["tasks"] == "10"
    assert page.raw.get_by_text("KeyError: 'no such sample'").first.is_visible()
    assert summary["failed"] == "3"  # boom and its two dependents
    assert summary["cancelled"] == "2"  # by the engine's shutdown, or by the script


@pytest.mark.timeout(60)
def test_a_report_that_cannot_be_written_leaves_the_exit_status_alone(
    tmp_path: Path,
) -> None:
    nowhere = tmp_path / "missing" / "run.html"
    returncode, stderr, _ = asyncflow_run(tmp_path, "raise", nowhere)
    assert returncode == 1
    assert "RuntimeError: the script gave up" in stderr
    assert "asyncflow: report not written: FileNotFoundError" in stderr
