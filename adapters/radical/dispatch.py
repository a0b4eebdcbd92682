"""Tasks to radical.pilot and outcomes back, without blocking the event loop.

``TaskManager.submit_tasks`` and ``cancel_tasks`` block (they talk to the
client components over ZMQ and wait for acknowledgement), so the event loop
only appends to a queue, and one thread per runtime drains it: everything that
became ready in one loop turn goes to radical.pilot as one bulk submission.
Outcomes arrive on radical.pilot's own callback thread and go straight into
the owning backend's sink, which is thread-safe and batches wake-ups.

Several backends can share one runtime, so each task is routed back by its
radical.pilot uid to the :class:`Record` of the backend that submitted it.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
import shlex
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from ...errors import BackendError, TaskDefinitionError, WorkerLostError
from ...spec import Command, TaskSpec
from ._rp import FINAL, rp
from .worker import call_remote, pack_call


class Owner(Protocol):
    """Where a record's outcome goes: its backend, or a chunk's stand-in."""

    def _deliver(self, rec: Record, task: Any, state: str) -> None: ...

    def _deliver_running(self, rec: Record) -> None: ...

    def _deliver_error(self, rec: Record, exc: BaseException) -> None: ...


__all__ = ["Dispatcher", "Record", "command_line"]

log = logging.getLogger("asyncflow.radical")

#: TaskDescription keys the adapter sets itself (not allowed in options=)
MANAGED_TD_KEYS = frozenset(
    {
        "uid",
        "name",
        "mode",
        "executable",
        "arguments",
        "function",
        "args",
        "kwargs",
        "raptor_id",
        "ranks",
        "cores_per_rank",
        "gpus_per_rank",
        "mem_per_rank",
        "stdout",
        "stderr",
        "pilot",
        "timeout",
        "environment",
        "sandbox",
    }
)


@dataclass(slots=True)
class Record:
    """One submitted spec, from the adapter's side."""

    backend: Owner
    uid: str
    name: str
    command: Command | None
    spec: TaskSpec | None  # dropped once the description is built
    rp_uid: str = ""
    cancelled: bool = False


class Dispatcher:
    """The submitter thread and the routing of radical.pilot's task callbacks.

    ``raptor_uids`` are the raptor master and workers: when one of them ends,
    ``on_raptor_lost`` decides what that means for function tasks; ``raptor_up``
    is set once a worker runs.
    """

    def __init__(
        self,
        prefix: str,
        paths: Sequence[str],
        on_raptor_lost: Callable[[Any, str], None],
    ):
        self._prefix = prefix
        self._counter = itertools.count(1)
        self._paths = tuple(paths)
        self._on_raptor_lost = on_raptor_lost
        self.tmgr: Any = None
        self.raptor_id = ""
        self.raptor_uids: set[str] = set()
        self.raptor_up = threading.Event()  # a worker runs, or a function returned
        self.routes: dict[str, Record] = {}
        self._cond = threading.Condition()
        self._queue: list[Record] = []
        self._cancels: list[str] = []
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.broken: str | None = None  # the pilot is gone: why
        #: where cancelled function tasks get their tickets; seen by the workers
        self.tickets = ""

    def attach(self, tmgr: Any) -> None:
        self.tmgr = tmgr
        tmgr.register_callback(self._on_task_state)

    def new_uid(self) -> str:
        return f"{self._prefix}{next(self._counter):06d}"

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._loop, name="asyncflow-radical-submit", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(2)

    # -- called on the event loop: queue only ---------------------------------------
    def submit(self, records: list[Record]) -> None:
        with self._cond:
            self._queue.extend(records)
            self._cond.notify()

    def cancel(self, records: Sequence[Record]) -> None:
        """Cancel in radical.pilot what it was given, and drop the rest before
        it is.  Raptor runs a queued function task it was told to cancel, so
        such a task also gets a ticket, a file its worker looks for before
        calling the function (:func:`~.worker.call_remote`)."""
        with self._cond:
            for rec in records:
                rec.cancelled = True
                if not rec.rp_uid:
                    continue  # the submitter skips it
                self._cancels.append(rec.rp_uid)
                if rec.command is None and self.tickets:
                    with contextlib.suppress(OSError):
                        open(os.path.join(self.tickets, rec.rp_uid), "w").close()
            self._cond.notify()

    def fail_functions(self, reason: str) -> None:
        """Report every function task in flight as lost: raptor is gone."""
        for rec in list(self.routes.values()):
            if rec.command is None and self.routes.pop(rec.rp_uid, None) is not None:
                rec.backend._deliver_error(
                    rec,
                    WorkerLostError(
                        f"task {rec.name!r}: the raptor workers that run function "
                        f"tasks went away ({reason})"
                    ),
                )

    def fail_all(self, reason: str) -> None:
        """The pilot is gone: report every task in flight as lost, and every task
        submitted from now on (radical.pilot would hold them for a pilot that
        never comes back)."""
        with self._cond:
            self.broken = reason
            queued, self._queue = self._queue, []
        self._lose([*queued, *list(self.routes.values())], reason)

    def _lose(self, records: list[Record], reason: str) -> None:
        for rec in records:
            if rec.rp_uid and self.routes.pop(rec.rp_uid, None) is None:
                continue  # already reported
            rec.backend._deliver_error(
                rec, WorkerLostError(f"task {rec.name!r}: {reason}")
            )

    # -- the submitter thread ----------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self._queue or self._cancels or self._stopping):
                    self._cond.wait()
                if self._stopping:
                    return
                batch, self._queue = self._queue, []
                cancels, self._cancels = self._cancels, []
            if cancels:
                try:
                    self.tmgr.cancel_tasks(cancels)
                except Exception:
                    log.exception("radical.pilot failed to cancel %s", cancels)
            if batch:
                try:
                    self._submit(batch)
                except Exception as exc:  # keep the thread alive for the next batch
                    log.exception("asyncflow: submitting to radical.pilot failed")
                    self._fail(batch, "submission to radical.pilot failed", exc)

    def _submit(self, batch: list[Record]) -> None:
        with self._cond:  # a cancel from now on sees the uid, and cancels it
            batch = [r for r in batch if not r.cancelled and r.spec is not None]
            for rec in batch:
                rec.rp_uid = self.new_uid()
        tds = self._routed(batch)
        if not tds:
            return
        if self.broken:  # checked after the routes are in: see fail_all
            self._lose(self._unreported(tds), self.broken)
            return
        try:
            self.tmgr.submit_tasks(tds)
        except Exception as exc:
            self._fail(self._unreported(tds), "radical.pilot refused it", exc)

    def _unreported(self, tds: list[Any]) -> list[Record]:
        """The records of ``tds`` still routed: no outcome reached them yet."""
        return [r for td in tds if (r := self.routes.get(td.uid))]

    def _routed(self, batch: list[Record]) -> list[Any]:
        """TaskDescriptions for ``batch``, each routed back to its record; a
        task that cannot be described fails alone."""
        tds = []
        for rec in batch:
            spec, rec.spec = rec.spec, None
            assert spec is not None
            try:
                td = self._describe(spec, rec.rp_uid)
            except Exception as exc:
                rec.backend._deliver_error(rec, exc)
                continue
            self.routes[td.uid] = rec
            tds.append(td)
        return tds

    def _fail(self, batch: list[Record], what: str, exc: Exception) -> None:
        for rec in batch:
            if rec.rp_uid and self.routes.pop(rec.rp_uid, None) is None:
                continue  # already reported
            error = BackendError(
                f"task {rec.name!r}: {what} ({type(exc).__name__}: {exc})"
            )
            rec.backend._deliver_error(rec, error)

    def _describe(self, spec: TaskSpec, uid: str) -> Any:
        res = spec.resources
        td: dict[str, Any] = {"uid": uid, "name": spec.name[:64]}
        td.update(_user_keys(spec))
        if spec.command is not None:
            td["executable"] = command_line(spec.command)
            capture = spec.command.capture
            if capture.stdout is not None:
                td["stdout"] = capture.stdout
            if capture.stderr is not None:
                td["stderr"] = capture.stderr
            td["ranks"] = res.ranks
            td["cores_per_rank"] = res.cores
            td["gpus_per_rank"] = float(res.gpus)
            if res.memory:
                td["mem_per_rank"] = math.ceil(res.memory / res.ranks)
        else:
            payload = pack_call(spec)
            td["mode"] = rp.TASK_FUNCTION
            td["raptor_id"] = self.raptor_id
            ticket = os.path.join(self.tickets, uid) if self.tickets else ""
            td["function"] = rp.PythonTask(
                call_remote, (self._paths, spec.name, payload, ticket), {}
            )
            module = getattr(spec.function, "__module__", None)
            # a chunk's calls name their own functions' modules
            modules = [module, *spec.options.get("asyncflow_modules", ())]
            modules = [m for m in modules if m and m != "__main__"]
            if modules:  # the AsyncflowWorker imports them once
                td["metadata"] = {
                    **td.get("metadata", {}),
                    "asyncflow_modules": modules,
                    "asyncflow_path": self._paths,
                }
        return rp.TaskDescription(td)

    # -- radical.pilot's callback thread -----------------------------------------------
    def _on_task_state(self, task: Any, state: str) -> None:
        if state == rp.AGENT_EXECUTING:
            self._on_executing(task.uid)
        elif state in FINAL:
            self._on_final(task, state)

    def _on_executing(self, uid: str) -> None:
        """A task of ours runs; a raptor worker running means the raptor
        master serves function tasks."""
        rec = self.routes.get(uid)
        if rec is not None:
            rec.backend._deliver_running(rec)
        elif uid in self.raptor_uids and uid != self.raptor_id:
            self.raptor_up.set()

    def _on_final(self, task: Any, state: str) -> None:
        uid = task.uid
        rec = self.routes.pop(uid, None)
        if rec is None:
            if uid in self.raptor_uids:
                self._on_raptor_lost(task, state)
            return
        if rec.command is None and state == rp.DONE:
            self.raptor_up.set()
        try:
            rec.backend._deliver(rec, task, state)
        except Exception as exc:  # never let a bad result kill rp's thread
            log.exception("asyncflow: failed to report %s", uid)
            rec.backend._deliver_error(
                rec,
                BackendError(
                    f"task {rec.name!r}: its outcome could not be read "
                    f"({type(exc).__name__}: {exc})"
                ),
            )


def _user_keys(spec: TaskSpec) -> Mapping[str, Any]:
    """``options={'radical': {...}}``: the TaskDescription keys users may set."""
    extra = spec.options.get("radical") if spec.options else None
    if not extra:
        return {}
    if not isinstance(extra, Mapping):
        raise TaskDefinitionError(
            f"task {spec.name!r}: options={{'radical': ...}} must be a dict "
            "of TaskDescription keys"
        )
    bad = set(extra) - set(rp.TaskDescription._schema) | (set(extra) & MANAGED_TD_KEYS)
    if bad:
        raise TaskDefinitionError(
            f"task {spec.name!r}: options['radical'] keys {sorted(bad)} are "
            "not TaskDescription keys the adapter leaves to you; use e.g. "
            "pre_exec, post_exec, named_env, priority, tags"
        )
    return extra


def command_line(cmd: Command) -> str:
    """The exec-script line for a command, quoted for /bin/sh.

    The whole command goes into ``executable``, not ``arguments``: radical.pilot
    wraps each argument in double quotes, so ``$`` and backticks in them would
    be expanded by the task's shell.
    """
    if cmd.shell:
        line = "/bin/sh -c " + shlex.quote(str(cmd.argv))
    else:
        line = " ".join(shlex.quote(a) for a in cmd.argv)
    if cmd.env:
        pairs = " ".join(shlex.quote(f"{k}={v}") for k, v in cmd.env.items())
        line = f"env {pairs} {line}"
    if cmd.cwd is not None:
        line = f"cd {shlex.quote(cmd.cwd)} && exec {line}"
    return line
