"""Events, traces and summaries seen from a user's side."""

from __future__ import annotations

import asyncio
import itertools
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from asyncflow import AsyncflowError, ConcurrentExecutionBackend, WorkflowEngine
from asyncflow.adapters.concurrent import process_backend
from asyncflow.conformance import tasks as t
from asyncflow.events import EventKind, TaskEvent

pytestmark = pytest.mark.timeout(60)


def threads() -> ConcurrentExecutionBackend:
    return ConcurrentExecutionBackend(ThreadPoolExecutor(2))


async def test_every_state_change_is_an_event(tmp_path: Path) -> None:
    seen: list[TaskEvent] = []
    async with WorkflowEngine(backend=threads()) as flow:
        flow.subscribe(seen.append)
        inc, boom = flow.function_task(t.inc), flow.function_task(t.boom)
        flaky = flow.function_task(retries=1)(t.flaky)
        # A timeout keeps the dependent out of the runtime until its input is
        # in (a piped task never waits in the engine, so never emits WAITING).
        await flow.function_task(timeout=60)(t.inc)(inc(1))
        with pytest.raises(ValueError):
            await boom()
        await flaky(str(tmp_path / "f"), 1)
        held = inc(boom())
        with pytest.raises(AsyncflowError):
            await held
    kinds = {(e.name, e.kind) for e in seen}
    for kind in ("created", "waiting", "submitted", "running", "done"):
        assert ("inc", EventKind(kind)) in kinds
    assert ("boom", EventKind.FAILED) in kinds
    failures = {e.name: e.detail for e in seen if e.kind is EventKind.FAILED}
    assert failures["boom"] == "ValueError: boom"
    assert failures["inc"].startswith("DependencyFailureError: ")
    assert ("flaky", EventKind.RETRIED) in kinds
    assert all(e.backend == "concurrent-threads" for e in seen if e.kind == "submitted")
    assert all(e.time > 0 and e.uid for e in seen)


async def test_async_iterator_of_events() -> None:
    async with WorkflowEngine(backend=threads()) as flow:
        stream = flow.events()
        inc = flow.function_task(t.inc)
        await inc(1)
        got = []
        async for event in stream:
            got.append(event.kind)
            if event.kind is EventKind.DONE:
                break
        assert got[0] is EventKind.CREATED and got[-1] is EventKind.DONE


async def test_cancel_emits_cancelled() -> None:
    seen: list[TaskEvent] = []
    async with WorkflowEngine(backend=threads()) as flow:
        flow.subscribe(seen.append)
        inc = flow.function_task(t.inc)
        a = inc(1)
        b = inc(a)
        b.cancel()
        await a
    assert [e.kind for e in seen if e.uid == b.uid][-1] is EventKind.CANCELLED


async def test_trace_and_summary(tmp_path: Path) -> None:
    async with WorkflowEngine(backend=threads()) as flow:
        flow.record_trace()
        inc, total = flow.function_task(t.inc), flow.function_task(t.total)
        leaves = [inc(i) for i in range(20)]
        await total(*[inc(x) for x in leaves])
        path = flow.export_trace(str(tmp_path / "run.json"))
        summary = flow.summary()
    trace = json.loads(Path(path).read_text())
    complete = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert len(complete) == 41
    assert {e["args"]["uid"] for e in complete} == set(
        flow._recorder.records  # type: ignore[union-attr]
    )
    assert summary["tasks"] == 41 and summary["by_state"] == {"done": 41}
    assert summary["by_backend"] == {"concurrent-threads": {"done": 41}}
    assert len(summary["critical_path"]) == 3
    assert 0 < summary["critical_path_time"] <= summary["total_time"]


async def test_export_without_recording_says_how() -> None:
    async with WorkflowEngine(backend=threads()) as flow:
        with pytest.raises(AsyncflowError, match="record_trace"):
            flow.export_trace("x.json")


def test_engine_shuts_down_when_its_loop_ends() -> None:
    backend = threads()

    async def forgetful() -> None:
        flow = WorkflowEngine(backend=backend)
        assert await flow.function_task(t.inc)(1) == 2

    asyncio.run(forgetful())
    assert backend._closed


class _QueuedBackend(ConcurrentExecutionBackend):
    """A thread pool that says, as a batch runtime would, that its job waits."""

    async def start(self, sink) -> None:  # type: ignore[no-untyped-def]
        await super().start(sink)
        sink.set_backend_state(self, "queued", "Slurm job 7 is waiting (Resources)")


async def test_backend_state_is_an_event_and_shows_in_progress() -> None:
    from asyncflow.progress import ProgressDisplay

    seen: list[TaskEvent] = []
    progress = ProgressDisplay()
    flow = WorkflowEngine(backend={"hpc": _QueuedBackend(ThreadPoolExecutor(1))})
    flow.subscribe(seen.append)
    flow.subscribe(progress)
    try:
        await flow.start()
        await flow.function_task(t.inc)(1)
    finally:
        await flow.shutdown()
    backend_events = [e for e in seen if e.kind is EventKind.BACKEND]
    assert [(e.backend, e.name, e.detail) for e in backend_events] == [
        ("hpc", "queued", "Slurm job 7 is waiting (Resources)")
    ]
    assert "hpc: Slurm job 7 is waiting (Resources)" in str(
        progress._progress.tasks[0].description
    )


def _busy(seconds: float) -> float:
    """Works (rather than sleeps) so that chunking sees real task durations."""
    import time

    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass
    return seconds


async def test_trace_of_chunked_tasks_shows_each_tasks_own_run() -> None:
    """A process pool runs short tasks in chunks; the trace still draws each
    task over its own run, on the worker that ran it, never on more tracks
    than the pool has workers."""
    backend = process_backend(2)
    async with WorkflowEngine(backend=backend) as flow:
        recorder = flow.record_trace()
        busy = flow.function_task(_busy)
        await asyncio.gather(*(busy(0.002) for _ in range(200)))
    trace = recorder.chrome_trace()["traceEvents"]
    bars = [e for e in trace if e["ph"] == "X"]
    lanes = {e["args"]["name"] for e in trace if e.get("name") == "thread_name"}
    assert len(bars) == 200
    assert lanes and len(lanes) <= 2 and all(n.startswith("worker pid ") for n in lanes)
    by_lane: dict[int, list[tuple[float, float]]] = {}
    for bar in bars:
        by_lane.setdefault(bar["tid"], []).append((bar["ts"], bar["ts"] + bar["dur"]))
    for spans in by_lane.values():
        spans.sort()
        for (_, end), (start, _) in itertools.pairwise(spans):
            assert start >= end - 1.0, "a worker runs one task at a time (1 us slack)"
