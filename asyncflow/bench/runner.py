"""The parent side of :mod:`.child`: one subprocess per backend, its JSON lines
gathered and shown as they arrive, and its whole process group stopped on a
timeout or Ctrl-C.

Each child runs in a session of its own, so that stopping it also stops the
runtime workers it started, and nothing else.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

__all__ = ["run_backends", "run_child"]

#: benchmark children still running (``--quick`` runs several at once)
_LIVE: set[subprocess.Popen[str]] = set()


def run_child(
    spec: dict[str, Any], timeout: float, on_record: Callable[[dict[str, Any]], None]
) -> tuple[int, bool]:
    """Run one backend's child process; (exit code, whether it timed out).

    On a timeout or Ctrl-C its process group is stopped: SIGTERM first, which
    the child turns into an orderly shutdown, SIGKILL 60 s later."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "asyncflow.bench.child", json.dumps(spec)],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    _LIVE.add(proc)
    expired = threading.Event()

    def stop() -> None:
        expired.set()
        _signal_group(proc, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            _signal_group(proc, signal.SIGKILL)

    timer = threading.Timer(timeout, stop)
    timer.daemon = True
    timer.start()
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a runtime printing to stdout
            if isinstance(rec, dict) and "kind" in rec:
                on_record(rec)
        return proc.wait(), expired.is_set()
    except BaseException:
        stop()
        raise
    finally:
        timer.cancel()
        _LIVE.discard(proc)


def _signal_group(proc: subprocess.Popen[str], sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # the child's own session: only what it started
    except (ProcessLookupError, PermissionError):
        pass


class _Collector:
    """Every child's records, with the failures and notes among them printed as
    they arrive, so that a long run shows a broken backend at once."""

    def __init__(self, console: Any, progress: Any, bar: Any, notes: list[str]) -> None:
        self.console = console
        self.progress = progress
        self.bar = bar
        self.notes = notes
        self.records: list[dict[str, Any]] = []
        self.failures: list[str] = []

    def run(self, name: str, spec: dict[str, Any], timeout: float) -> None:
        self.progress.update(self.bar, description=f"benchmarking {name}")
        code, expired = run_child(
            {"backend": name, **spec}, timeout, lambda rec: self.record(name, rec)
        )
        if expired:
            self.fail(f"{name}: stopped after --timeout {timeout:.0f} s")
        elif code != 0:
            self.fail(f"{name}: benchmark process exited {code}")

    def record(self, name: str, rec: dict[str, Any]) -> None:
        rec["backend"] = name
        self.records.append(rec)
        if rec["kind"] == "run":
            self.progress.advance(self.bar)
        elif rec["kind"] == "error":
            self.fail(f"{name} {rec['side']}: {rec['text']}")
        elif rec["kind"] in ("skip", "note"):
            text = f"{name} {rec['side']}: {rec.get('workload', '')} {rec['text']}"
            self.notes.append(" ".join(text.split()))
            self.console.print(f"[yellow]{self.notes[-1]}")

    def fail(self, problem: str) -> None:
        self.failures.append(problem)
        self.console.print(f"[red]{problem}")


def run_backends(
    backends: Sequence[str],
    spec: dict[str, Any],
    timeout: float,
    total: int,
    notes: list[str],
    console: Any,
) -> tuple[list[dict[str, Any]], list[str]]:
    """Each backend's child, under a progress bar of ``total`` runs; (records,
    failures), with skips and notes added to ``notes``.

    ``--quick`` is a smoke test whose figures are not for comparing: its
    backends run side by side, so the slowest start-up (radical.pilot's pilots)
    sets the wall time instead of the sum of them all."""
    from rich.progress import Progress

    with Progress(console=console, transient=True) as progress:
        bar = progress.add_task("benchmarking", total=total)
        collector = _Collector(console, progress, bar, notes)
        if spec["quick"]:
            _side_by_side(collector, backends, spec, timeout)
        else:
            for name in backends:
                collector.run(name, spec, timeout)
    return collector.records, collector.failures


def _side_by_side(
    collector: _Collector, backends: Sequence[str], spec: dict[str, Any], timeout: float
) -> None:
    with ThreadPoolExecutor(max(1, len(backends))) as pool:
        try:
            list(pool.map(lambda name: collector.run(name, spec, timeout), backends))
        except BaseException:  # Ctrl-C: the children have sessions of their own
            for proc in list(_LIVE):
                _signal_group(proc, signal.SIGTERM)
            raise
