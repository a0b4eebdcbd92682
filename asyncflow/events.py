"""Task events, the trace recorder, Chrome trace export and run summaries.

The engine emits a :class:`TaskEvent` on every state change, but only builds one
when somebody listens: with no subscriber an emit costs one attribute test, so
the fan-out benchmark does not pay for observability it does not use.
"""

from __future__ import annotations

import asyncio
import enum
import json
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["EventKind", "TaskEvent", "TraceRecorder"]


class EventKind(enum.StrEnum):
    CREATED = "created"
    WAITING = "waiting"
    SUBMITTED = "submitted"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"
    RETRIED = "retried"
    BACKEND = "backend"
    """Not a task's: what a backend's runtime is doing (``name`` is ``queued``,
    ``running`` or ``ended``, ``detail`` says which batch job and why), so a
    job waiting in a batch queue shows as waiting rather than as a hang."""


@dataclass(frozen=True, slots=True)
class TaskEvent:
    time: float  # time.time() seconds
    kind: EventKind
    uid: str
    name: str
    backend: str
    attempt: int
    deps: tuple[str, ...] = ()
    detail: str = ""


Subscriber = Callable[[TaskEvent], None]


class EventStream:
    """``async for event in flow.events(): ...`` — an unbounded queue feed."""

    def __init__(self, unsubscribe: Callable[[], None]) -> None:
        self.queue: asyncio.Queue[TaskEvent] = asyncio.Queue()
        self._unsubscribe = unsubscribe

    def __aiter__(self) -> AsyncIterator[TaskEvent]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[TaskEvent]:
        try:
            while True:
                yield await self.queue.get()
        finally:
            self._unsubscribe()

    def close(self) -> None:
        self._unsubscribe()


@dataclass(slots=True)
class _Record:
    uid: str
    name: str
    backend: str
    deps: tuple[str, ...]
    created: float
    submitted: float | None = None
    running: float | None = None
    end: float | None = None
    state: str = "created"
    attempts: int = 1


@dataclass
class TraceRecorder:
    """Keeps one record per task while subscribed; feeds trace and summary."""

    records: dict[str, _Record] = field(default_factory=dict)
    started: float = field(default_factory=time.time)

    def __call__(self, ev: TaskEvent) -> None:
        kind = ev.kind
        if kind is EventKind.CREATED:
            self.records[ev.uid] = _Record(
                ev.uid, ev.name, ev.backend, ev.deps, ev.time
            )
            return
        rec = self.records.get(ev.uid)
        if rec is None:
            return
        rec.state = kind.value
        if kind is EventKind.SUBMITTED:
            rec.submitted = ev.time
            rec.backend = ev.backend
        elif kind is EventKind.RUNNING:
            rec.running = ev.time
        elif kind is EventKind.RETRIED:
            rec.attempts = ev.attempt + 1
            rec.running = None
        elif kind in (EventKind.DONE, EventKind.FAILED, EventKind.CANCELLED):
            rec.end = ev.time

    # -- summary ---------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        by_state = Counter(r.state for r in self.records.values())
        by_backend: dict[str, Counter[str]] = {}
        for r in self.records.values():
            by_backend.setdefault(r.backend, Counter())[r.state] += 1
        ends = [r.end for r in self.records.values() if r.end is not None]
        starts = [r.created for r in self.records.values()]
        total = (max(ends) - min(starts)) if ends and starts else 0.0
        return {
            "tasks": len(self.records),
            "by_state": dict(by_state),
            "by_backend": {b: dict(c) for b, c in by_backend.items()},
            "total_time": total,
            "critical_path_time": self.critical_path()[0],
            "critical_path": self.critical_path()[1],
        }

    def critical_path(self) -> tuple[float, list[str]]:
        """The longest chain of dependent task run times (seconds, uids)."""
        best: dict[str, tuple[float, list[str]]] = {}
        for uid in sorted(self.records, key=lambda u: self.records[u].created):
            rec = self.records[uid]
            start = rec.running or rec.submitted
            own = (rec.end - start) if (rec.end is not None and start) else 0.0
            prev = max(
                (best[d] for d in rec.deps if d in best),
                key=lambda x: x[0],
                default=(0.0, []),
            )
            best[uid] = (prev[0] + own, [*prev[1], uid])
        return max(best.values(), key=lambda x: x[0], default=(0.0, []))

    # -- Chrome trace ---------------------------------------------------------
    def chrome_trace(
        self, zero: float | None = None, pid_base: int = 0
    ) -> dict[str, Any]:
        """Complete ("X") events, one track per backend slot.

        Runtimes do not say which worker ran a task, so tasks are packed into the
        fewest lanes that never overlap: each lane is a slot that was busy.
        """
        base = self.started if zero is None else zero
        events: list[dict[str, Any]] = []
        lanes: dict[str, list[float]] = {}
        pids: dict[str, int] = {}
        done = [
            r
            for r in self.records.values()
            if r.end is not None and (r.running or r.submitted)
        ]
        for rec in sorted(done, key=lambda r: r.running or r.submitted or 0.0):
            start = rec.running or rec.submitted or rec.created
            end = rec.end or start
            pid = pids.setdefault(rec.backend, pid_base + len(pids) + 1)
            lane = _free_lane(lanes.setdefault(rec.backend, []), start, end)
            events.append(_complete_event(rec, pid, lane, (start, end), base))
        events += _track_names(pids, lanes)
        return {"traceEvents": events, "displayTimeUnit": "ms"}

    def export(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.chrome_trace()))
        return path


def _free_lane(busy: list[float], start: float, end: float) -> int:
    """The first lane free by ``start``, or a new one, marked busy until ``end``
    (``busy`` holds the time each lane frees up)."""
    lane = next((i for i, free in enumerate(busy) if free <= start), None)
    if lane is None:
        busy.append(end)
        return len(busy) - 1
    busy[lane] = end
    return lane


def _complete_event(
    rec: _Record, pid: int, lane: int, span: tuple[float, float], base: float
) -> dict[str, Any]:
    """One task's bar; ``queued_us`` keeps the wait between creation and start,
    which the bar itself does not show."""
    start, end = span
    return {
        "name": rec.name,
        "cat": rec.state,
        "ph": "X",
        "pid": pid,
        "tid": lane + 1,
        "ts": (start - base) * 1e6,
        "dur": max(0.0, end - start) * 1e6,
        "args": {
            "uid": rec.uid,
            "state": rec.state,
            "attempts": rec.attempts,
            "queued_us": ((start - rec.created) * 1e6),
        },
    }


def _track_names(
    pids: dict[str, int], lanes: dict[str, list[float]]
) -> list[dict[str, Any]]:
    """Metadata events naming each process after its backend and each thread
    after its slot, so the viewer shows names rather than numbers."""
    events: list[dict[str, Any]] = []
    for backend, pid in pids.items():
        events.append(
            {
                "name": "process_name",
                "ph": "M",
                "pid": pid,
                "args": {"name": f"backend {backend}"},
            }
        )
        for lane in range(len(lanes[backend])):
            events.append(
                {
                    "name": "thread_name",
                    "ph": "M",
                    "pid": pid,
                    "tid": lane + 1,
                    "args": {"name": f"slot {lane + 1}"},
                }
            )
    return events


def merge_traces(recorders: list[TraceRecorder]) -> dict[str, Any]:
    """One trace for several engines, on a common clock."""
    zero = min((r.started for r in recorders), default=0.0)
    events: list[dict[str, Any]] = []
    for r in recorders:
        pid_base = max((e["pid"] for e in events), default=0)
        events += r.chrome_trace(zero, pid_base)["traceEvents"]
    return {"traceEvents": events, "displayTimeUnit": "ms"}
