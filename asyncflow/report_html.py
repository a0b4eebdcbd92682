"""A run report as one self-contained HTML file (``asyncflow run --report``).

The trace recorder already keeps one record per task; this module turns those
records into one JSON blob (columns rather than one object per task, so that
10,000 tasks stay a few hundred kilobytes) and inlines it into a page whose
script draws the DAG, the timeline, the critical path, the utilisation and the
failures.  Nothing is fetched when the file is opened: it is meant to be mailed,
attached to a ticket or opened from a cluster's scratch space.

The report describes whatever the records hold when it is written, so a run
that failed or was interrupted still gets one: tasks that never ended show as
pending (or cancelled, when the engine's shutdown cancelled them).
"""

from __future__ import annotations

import heapq
import html
import json
import sys
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from .report_page import PAGE

__all__ = ["report_data", "write_report"]

#: how the page groups the engine's states; ``retried`` is waiting to run again
STATES = ("pending", "running", "done", "failed", "cancelled")
_STATE_OF = {
    "created": 0,
    "waiting": 0,
    "submitted": 0,
    "retried": 0,
    "cached": 2,
    "running": 1,
    "done": 2,
    "failed": 3,
    "cancelled": 4,
}
#: a message longer than this is cut: a command's stderr can be megabytes
ERROR_CHARS = 2000
_DEPENDENCY = "DependencyFailureError:"


class _Record(Protocol):
    """What the report reads of a trace record (:class:`TraceRecorder`'s)."""

    uid: str
    name: str
    backend: str
    deps: tuple[str, ...]
    created: float
    submitted: float | None
    running: float | None
    end: float | None
    state: str
    attempts: int
    ran_until: float | None
    worker: str
    error: str


class _Recorder(Protocol):
    @property
    def records(self) -> Mapping[str, _Record]: ...


def write_report(
    path: str | Path,
    recorders: Sequence[_Recorder],
    *,
    title: str = "asyncflow run",
    note: str = "",
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write the report of every task the ``recorders`` saw (one per engine).

    ``note`` says how the run ended when the caller knows (the command line
    does: interrupted, an exception, an exit status); ``extra`` adds counts
    the records do not hold, such as the result store's hits."""
    path = Path(path)
    data = report_data(recorders, title=title, note=note, extra=extra)
    path.write_text(render(data), encoding="utf-8")
    return path


def engines_report(path: str | Path, engines: Sequence[Any], note: str) -> Path:
    """The report of every engine a script created (``asyncflow run``): one
    page for them all, their result stores' counts added up."""
    extra: Counter[str] = Counter()
    for engine in engines:
        extra.update(engine._store_counts())
    recorders = [e._recorder for e in engines if e._recorder is not None]
    title = f"asyncflow run: {Path(sys.argv[0]).name}"
    return write_report(path, recorders, title=title, note=note, extra=extra)


def outcome(code: int | None, exc: BaseException | None) -> str:
    """How a script run by ``asyncflow run`` ended, for the report's header
    (the codes are those ``asyncflow run`` returns for signals)."""
    if exc is not None:
        return _cut(f"the script raised {type(exc).__name__}: {exc}")
    known = {130: "interrupted (Ctrl-C)", 143: "terminated (SIGTERM)"}
    if code:
        return known.get(code, f"the script exited with status {code}")
    return "the script finished"


def render(data: Mapping[str, Any]) -> str:
    """The page with ``data`` inlined; ``<`` is escaped inside the JSON so
    that no string in it (a task name, an error message) can close the
    script element (the JSON is ASCII, so nothing else needs escaping)."""
    blob = json.dumps(data, separators=(",", ":"), allow_nan=False)
    blob = blob.replace("<", "\\u003c")
    title = html.escape(str(data.get("title", "asyncflow run")))
    head, tail = PAGE.split("%%DATA%%")
    return head.replace("%%TITLE%%", title) + blob + tail


def report_data(
    recorders: Sequence[_Recorder],
    *,
    title: str = "asyncflow run",
    note: str = "",
    extra: Mapping[str, Any] | None = None,
    now: float | None = None,
) -> dict[str, Any]:
    """The blob the page renders: a column per task field, indices for
    names, backends and states, times in milliseconds since the first task
    was created."""
    records = [r for rec in recorders for r in rec.records.values()]
    now = time.time() if now is None else now
    zero = min((r.created for r in records), default=now)
    cols = _Columns(zero, now)
    index: dict[tuple[int, str], int] = {}
    for n, rec in enumerate(recorders):
        for uid in rec.records:
            index[n, uid] = len(index)
    for n, rec in enumerate(recorders):
        for r in rec.records.values():
            cols.add(r, [index[n, d] for d in r.deps if (n, d) in index])
    end = max((e for e in cols.end if e is not None), default=0.0)
    makespan = max([end, *(e for e in cols.run_end if e is not None)])
    lanes = _assign_lanes(cols)
    critical, critical_ms = _critical_path(cols)
    return {
        "v": 1,
        "title": title,
        "note": note,
        "generated": now,
        "zero": zero,
        "makespan": makespan,
        "states": STATES,
        "names": list(cols.names),
        "backends": list(cols.backends),
        "tasks": cols.table(),
        "errors": cols.errors,
        "roots": _root_causes(cols),
        "lanes": lanes,
        "critical": critical,
        "critical_ms": critical_ms,
        "utilisation": _utilisation(cols, lanes, makespan),
        "summary": _summary(records, cols, extra),
    }


@dataclass
class _Columns:
    """The task table being built, one list per field."""

    zero: float
    now: float
    names: dict[str, int] = field(default_factory=dict)
    backends: dict[str, int] = field(default_factory=dict)
    workers: list[str] = field(default_factory=list)
    uid: list[str] = field(default_factory=list)
    name: list[int] = field(default_factory=list)
    state: list[int] = field(default_factory=list)
    backend: list[int] = field(default_factory=list)
    created: list[float] = field(default_factory=list)
    start: list[float | None] = field(default_factory=list)
    run_end: list[float | None] = field(default_factory=list)
    end: list[float | None] = field(default_factory=list)
    deps: list[list[int]] = field(default_factory=list)
    lane: list[int] = field(default_factory=list)
    attempts: dict[int, int] = field(default_factory=dict)
    errors: dict[int, str] = field(default_factory=dict)

    def ms(self, t: float | None) -> float | None:
        return None if t is None else round((t - self.zero) * 1e3, 3)

    def add(self, r: _Record, deps: list[int]) -> None:
        i = len(self.uid)
        self.uid.append(r.uid)
        self.name.append(self.names.setdefault(r.name, len(self.names)))
        self.backend.append(self.backends.setdefault(r.backend, len(self.backends)))
        self.state.append(_STATE_OF.get(r.state, 0))
        self.workers.append(r.worker)
        self.created.append(self.ms(r.created) or 0.0)
        start, stop = _run_span(r, self.now)
        self.start.append(self.ms(start))
        self.run_end.append(self.ms(stop))
        self.end.append(self.ms(r.end))
        self.deps.append(deps)
        self.lane.append(-1)
        if r.attempts > 1:
            self.attempts[i] = r.attempts
        if r.state == "failed":
            self.errors[i] = _cut(r.error or "failed")

    def table(self) -> dict[str, Any]:
        return {
            "uid": self.uid,
            "name": self.name,
            "state": self.state,
            "backend": self.backend,
            "created": self.created,
            "start": self.start,
            "run_end": self.run_end,
            "end": self.end,
            "deps": self.deps,
            "lane": self.lane,
            "attempts": self.attempts,
        }


def _run_span(r: _Record, now: float) -> tuple[float | None, float | None]:
    """When the task ran, as measured where it ran if the adapter said.

    A task still running is drawn up to ``now``.  Without a RUNNING event (a
    runtime that does not report starts) a finished task's span is its time
    in the backend; a task that never ran (a dependency failure, a hit in the
    result store, a cancelled one) has no span: its waiting is not work."""
    if r.running is not None:
        if r.ran_until is not None:
            return r.running, r.ran_until
        return r.running, r.end if r.end is not None else now
    if r.state == "done" and r.submitted is not None and r.end is not None:
        return r.submitted, r.end
    return None, None


def _cut(message: str) -> str:
    if len(message) <= ERROR_CHARS:
        return message
    return message[:ERROR_CHARS] + f"... ({len(message) - ERROR_CHARS} more chars)"


def _assign_lanes(cols: _Columns) -> list[dict[str, Any]]:
    """One lane per worker an adapter named, else the fewest lanes on which
    the backend's runs never overlap (each is a slot that was busy).  Sets
    ``cols.lane`` per task (-1: no span); lanes come grouped by backend, so
    that the timeline shows each backend's slots together."""
    ran = sorted(
        (i for i, s in enumerate(cols.start) if s is not None),
        key=lambda i: cols.start[i] or 0.0,
    )
    lanes: list[tuple[int, str]] = []
    named: dict[tuple[int, str], int] = {}
    free: dict[int, list[tuple[float, int]]] = {}
    packed: Counter[int] = Counter()
    for i in ran:
        b, worker = cols.backend[i], cols.workers[i]
        if worker:
            if (b, worker) not in named:
                named[b, worker] = len(lanes)
                lanes.append((b, f"worker {worker}"))
            cols.lane[i] = named[b, worker]
            continue
        heap = free.setdefault(b, [])
        if heap and heap[0][0] <= (cols.start[i] or 0.0):
            lane = heapq.heappop(heap)[1]
        else:
            lane, packed[b] = len(lanes), packed[b] + 1
            lanes.append((b, f"slot {packed[b]}"))
        heapq.heappush(heap, (cols.run_end[i] or 0.0, lane))
        cols.lane[i] = lane
    order = sorted(range(len(lanes)), key=lambda n: lanes[n][0])
    moved = {old: new for new, old in enumerate(order)}
    cols.lane = [moved.get(n, -1) for n in cols.lane]
    return [{"backend": lanes[n][0], "name": lanes[n][1]} for n in order]


def _critical_path(cols: _Columns) -> tuple[list[int], float]:
    """The chain of dependencies with the longest measured run time in total.

    Only measured runs count: time spent waiting for an upstream is not on
    the path, so a dependent submitted early (piped) does not lengthen it.
    Tasks are in creation order, so every upstream comes before its
    dependents and one pass suffices.  Of equal paths the one ending last
    wins, so that tasks that never ran (dependency failures) stay on it."""
    best = [0.0] * len(cols.uid)
    via = [-1] * len(cols.uid)
    for i, deps in enumerate(cols.deps):
        start, stop = cols.start[i], cols.run_end[i]
        own = (stop - start) if start is not None and stop is not None else 0.0
        prev = max(deps, key=best.__getitem__, default=-1)
        best[i] = own + (best[prev] if prev >= 0 else 0.0)
        via[i] = prev
    if not best:
        return [], 0.0
    last = max(range(len(best)), key=lambda i: (best[i], i))
    path = [last]
    while via[path[-1]] >= 0:
        path.append(via[path[-1]])
    return path[::-1], round(best[last], 3)


def _root_causes(cols: _Columns) -> dict[int, int]:
    """For each dependency failure, the task whose own code failed.

    The engine fails a task's dependents when the first of its upstreams
    fails, so among several failed upstreams the one that ended first is the
    one named; following those back (upstreams come first in creation order)
    ends at a failure of the task's own."""
    roots: dict[int, int] = {}
    for i, message in cols.errors.items():
        if not message.startswith(_DEPENDENCY):
            continue
        failed = [d for d in cols.deps[i] if d in cols.errors]
        if not failed:
            continue
        first = min(failed, key=lambda d: cols.end[d] or 0.0)
        roots[i] = roots.get(first, first)
    return roots


def _utilisation(
    cols: _Columns, lanes: list[dict[str, Any]], makespan: float
) -> list[dict[str, Any]]:
    """Busy time over (slots x makespan) per backend: how much of the
    capacity the run saw in use was used.  Slots are the lanes above, so a
    pool that never ran two tasks at once counts as one slot."""
    busy = [0.0] * len(cols.backends)
    for i, start in enumerate(cols.start):
        stop = cols.run_end[i]
        if start is not None and stop is not None:
            busy[cols.backend[i]] += stop - start
    slots = Counter(x["backend"] for x in lanes)
    rows = []
    for b, name in enumerate(cols.backends):
        capacity = slots[b] * makespan
        rows.append(
            {
                "backend": name,
                "slots": slots[b],
                "busy_ms": round(busy[b], 3),
                "utilisation": round(busy[b] / capacity, 4) if capacity else 0.0,
            }
        )
    return rows


def _summary(
    records: Iterable[_Record], cols: _Columns, extra: Mapping[str, Any] | None
) -> dict[str, Any]:
    """The counts of ``flow.summary()`` over every engine's records."""
    by_state: Counter[str] = Counter()
    by_backend: dict[str, Counter[str]] = {}
    for r in records:
        by_state[r.state] += 1
        by_backend.setdefault(r.backend, Counter())[r.state] += 1
    ends = [e for e in cols.end if e is not None]
    return {
        "tasks": len(cols.uid),
        "by_state": dict(by_state),
        "by_backend": {b: dict(c) for b, c in by_backend.items()},
        "total_time": round(max(ends) / 1e3, 6) if ends else 0.0,
        **(extra or {}),
    }
