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
from collections.abc import AsyncIterator, Callable, Iterable
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
    CACHED = "cached"
    """Found in the result store: the task ends DONE without running."""
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
    #: FAILED: the exception as ``Type: message``; BACKEND: what the runtime does
    detail: str = ""
    #: RUNNING measured where the task ran: when it ended there, and the worker
    until: float | None = None
    worker: str = ""


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
    ran_until: float | None = None  # the end of its run, measured where it ran
    worker: str = ""
    error: str = ""  # a failure as ``Type: message``


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
            rec.ran_until = ev.until
            rec.worker = ev.worker
        elif kind is EventKind.RETRIED:
            rec.attempts = ev.attempt + 1
            rec.running = rec.ran_until = None
        elif kind in (EventKind.DONE, EventKind.FAILED, EventKind.CANCELLED):
            rec.end = ev.time
            if kind is EventKind.FAILED:
                rec.error = ev.detail

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
            end = rec.ran_until or rec.end
            own = (end - start) if (end is not None and start) else 0.0
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

        A task whose adapter said which worker ran it, and when (measured
        there), is drawn on that worker's track over its own run.  Runtimes that
        do not say are packed into the fewest lanes that never overlap: each
        lane is a slot that was busy.
        """
        base = self.started if zero is None else zero
        done = _drawn(self.records.values())
        tracks: dict[str, _Tracks] = {}
        for rec in done:
            tracks.setdefault(rec.backend, _Tracks()).workers.setdefault(rec.worker, 0)
        events: list[dict[str, Any]] = []
        for rec in done:
            start, end = _span(rec)
            backend = tracks[rec.backend]
            if not backend.pid:
                backend.pid = pid_base + len([t for t in tracks.values() if t.pid]) + 1
            lane = backend.lane(rec.worker, start, end)
            events.append(_complete_event(rec, backend.pid, lane, (start, end), base))
        events += _track_names(tracks)
        return {"traceEvents": events, "displayTimeUnit": "ms"}

    def export(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.chrome_trace()))
        return path


class _Tracks:
    """One backend's tracks: a lane per named worker first, then packed lanes
    for tasks whose worker is not known."""

    def __init__(self) -> None:
        self.pid = 0
        self.workers: dict[str, int] = {}  # worker -> lane; "" collected too
        self.busy: list[float] = []  # packed lanes: when each frees up

    def lane(self, worker: str, start: float, end: float) -> int:
        named = [w for w in self.workers if w]
        if worker:
            return named.index(worker)
        return len(named) + _free_lane(self.busy, start, end)

    def names(self) -> list[str]:
        named = [f"worker {w}" for w in self.workers if w]
        return named + [f"slot {i + 1}" for i in range(len(self.busy))]


def _free_lane(busy: list[float], start: float, end: float) -> int:
    """The first lane free by ``start``, or a new one, marked busy until ``end``
    (``busy`` holds the time each lane frees up)."""
    lane = next((i for i, free in enumerate(busy) if free <= start), None)
    if lane is None:
        busy.append(end)
        return len(busy) - 1
    busy[lane] = end
    return lane


def _drawn(records: Iterable[_Record]) -> list[_Record]:
    """The tasks that started and ended, in the order they started: a task
    never submitted has no bar to draw."""
    return sorted(
        (r for r in records if r.end is not None and (r.running or r.submitted)),
        key=lambda r: r.running or r.submitted or 0.0,
    )


def _span(rec: _Record) -> tuple[float, float]:
    """When a task's bar starts and ends: its run as measured where it ran if
    the adapter said, else as the engine saw it."""
    start = rec.running or rec.submitted or rec.created
    return start, rec.ran_until or rec.end or start


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


def _track_names(tracks: dict[str, _Tracks]) -> list[dict[str, Any]]:
    """Metadata events naming each process after its backend and each thread
    after its worker or slot, so the viewer shows names rather than numbers."""
    events: list[dict[str, Any]] = []
    for backend, track in tracks.items():
        pid = track.pid
        events.append(
            {
                "name": "process_name",
                "ph": "M",
                "pid": pid,
                "args": {"name": f"backend {backend}"},
            }
        )
        for lane, name in enumerate(track.names()):
            events.append(
                {
                    "name": "thread_name",
                    "ph": "M",
                    "pid": pid,
                    "tid": lane + 1,
                    "args": {"name": name},
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
