"""A live progress bar for ``asyncflow run --progress`` (rich).

Counts tasks by state from engine events; rich redraws at its own pace, so an
event costs a few dictionary updates, not a repaint.
"""

from __future__ import annotations

from collections import Counter

from .events import EventKind, TaskEvent

_FINAL = {EventKind.DONE, EventKind.FAILED, EventKind.CANCELLED}


class ProgressDisplay:
    def __init__(self) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        self._progress = Progress(
            TextColumn("[bold]asyncflow"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.description}"),
            transient=False,
        )
        self._task = self._progress.add_task("", total=0)
        self._state: dict[str, EventKind] = {}
        self._counts: Counter[EventKind] = Counter()
        self._backends: dict[str, str] = {}  # backend label -> what it is doing
        self._cached = 0  # found in the result store (each also ends as done)

    def __call__(self, event: TaskEvent) -> None:
        kind = event.kind
        if kind is EventKind.BACKEND:
            self._backends[event.backend] = event.detail
            return self._redraw()
        if kind is EventKind.CACHED:
            self._cached += 1
            return  # its DONE follows
        if kind is EventKind.RETRIED:
            kind = EventKind.SUBMITTED
        old = self._state.get(event.uid)
        if old is not None:
            self._counts[old] -= 1
        if kind in _FINAL:
            self._state.pop(event.uid, None)
        else:
            self._state[event.uid] = kind
        self._counts[kind] += 1
        self._redraw()

    def _redraw(self) -> None:
        done = sum(self._counts[k] for k in _FINAL)
        total = done + len(self._state)
        text = "  ".join(
            f"{k.value} {self._counts[k]}"
            for k in EventKind
            if self._counts[k] and k is not EventKind.CREATED
        )
        if self._cached:
            text += f"  (cached {self._cached})"
        if self._backends:
            from rich.markup import escape  # a nodelist such as n[1-3] is no markup

            states = self._backends.items()
            text += "".join(f"  {escape(f'{b}: {d}')}" for b, d in states)
        self._progress.update(self._task, completed=done, total=total, description=text)

    def start(self) -> None:
        self._progress.start()

    def stop(self) -> None:
        self._progress.stop()
