"""Short function tasks several to a Ray task (see :mod:`..toolkit.chunks`).

A Ray task costs the driver and the raylet a millisecond or so, which is all
of a no-op's run; Ray's own advice is not to make tasks that small, and
parameter sweeps and fine-grained DAGs make them anyway.  So when one batch
holds many calls of one function (a fan-out, a sweep, a chain called in one
go), those calls go through a chunk queue: several to one Ray task, sized to a
few milliseconds of measured work, with a chain's hops fused to run on inside
one worker.  Everything else keeps Ray's own path, where a result stays in the
object store until needed and a running task is stopped with its worker: small
batches, tasks with resources or ``options={'ray': ...}``, and tasks taking a
value Ray holds.  A chunk's result comes back to the driver, which is why a
task reading a Ray value is never chunked.

Ray's callbacks run on Ray's own threads, where submitting more work could
stall the thread that dispatches it; chunks are therefore sent from the event
loop, and a chunk's future here is a stand-in resolved from Ray's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any

import ray

from ...errors import WorkerLostError
from ...protocol import CompletionSink
from ...spec import TaskSpec
from ...walk import contains
from ...worker import Call, run_chunk
from ..toolkit import FunctionCache
from ..toolkit.chunks import ChunkQueue
from ..toolkit.routing import MIN_BURST, plain_call, route
from .results import RayValue
from .state import RayState, log

__all__ = ["RayChunks"]

_VALUES = frozenset({RayValue})


class RayChunks:
    """The chunk queue of one Ray backend, and what decides who uses it."""

    def __init__(self, state: RayState, enabled: bool):
        self._state = state
        self.enabled = enabled
        #: calls of one function in a batch from which they are chunked (set
        #: at start from the cluster's size unless given)
        self.burst: int | None = None
        self.queue: ChunkQueue | None = None
        self._functions = FunctionCache("Ray")
        self._remote: Any = None
        self._refs: dict[Future[Any], ray.ObjectRef] = {}

    def start(self, sink: CompletionSink) -> None:
        """Make the queue once Ray is up (its size is the cluster's CPUs); a
        second start (attached first, then started by an engine) brings a new
        sink, and so a new queue."""
        if not self.enabled:
            return
        self.close()
        if self._lose not in self._state.lost_hooks:
            self._state.lost_hooks.append(self._lose)
        cpus = sum(n.get("CPU", 0) for n in self._state.nodes) or 1
        self._remote = ray.remote(run_chunk)
        self.queue = ChunkQueue(
            self._send, _lost, int(cpus), sink, self._functions.blob, "Ray cluster"
        )
        if self.burst is None:
            self.burst = max(MIN_BURST, 2 * int(cpus))

    # -- routing -------------------------------------------------------------------
    def route(self, specs: Sequence[TaskSpec]) -> tuple[list[TaskSpec], list[str]]:
        """Queue the specs that go in chunks; the rest for Ray, and the uids of
        piped specs whose upstreams are split between the two."""
        queue, burst = self.queue, self.burst
        if queue is None or burst is None:
            return list(specs), []
        return route(queue, specs, burst, _eligible)

    # -- Ray's side ----------------------------------------------------------------
    def _send(self, calls: list[Call]) -> Future[Any]:
        stand_in: Future[Any] = Future()
        loop = self._state.life.loop
        assert loop is not None
        # A closed loop raises RuntimeError: the queue fails the chunk's tasks.
        loop.call_soon_threadsafe(self._launch, calls, stand_in)
        return stand_in

    def _launch(self, calls: list[Call], stand_in: Future[Any]) -> None:
        if stand_in.done():
            return  # every task of it was cancelled meanwhile
        if self._state.lost is not None:  # Ray is gone: fail at once
            stand_in.set_exception(WorkerLostError(self._state.lost))
            return
        try:
            ref = self._remote.remote(calls)
        except Exception as exc:
            stand_in.set_exception(exc)
            return
        self._refs[stand_in] = ref
        stand_in.add_done_callback(self._forget)
        ref.future().add_done_callback(lambda f: _copy(f, stand_in))

    def _lose(self, why: str) -> None:
        """Ray is gone: its futures will never finish, so fail the chunks out
        (the queue then fails each of their tasks, and the rest as sent)."""
        for stand_in in list(self._refs):
            if not stand_in.done():
                with contextlib.suppress(Exception):
                    stand_in.set_exception(WorkerLostError(why))

    def _forget(self, stand_in: Future[Any]) -> None:
        ref = self._refs.pop(stand_in, None)
        if ref is not None and stand_in.cancelled():
            _cancel(ref)  # every task of the chunk was cancelled: stop it

    # -- cancel and close ------------------------------------------------------------
    def cancel(self, uids: Sequence[str]) -> list[str]:
        """Cancel the chunked ones among ``uids``; return the others."""
        return list(uids) if self.queue is None else self.queue.cancel_many(uids)

    def close(self) -> None:
        """Stop sending, and stop the chunks still running in Ray."""
        queue, self.queue = self.queue, None
        if queue is None:
            return
        for stand_in in queue.close():
            ref = self._refs.pop(stand_in, None)
            if ref is not None:
                _cancel(ref)
        self._functions.clear()


def _eligible(spec: TaskSpec) -> bool:
    """A plain call that reads no value Ray holds (a chunk's arguments travel
    through the driver)."""
    return plain_call(spec, "ray") and not contains((spec.args, spec.kwargs), _VALUES)


def _copy(ray_future: Future[Any], stand_in: Future[Any]) -> None:
    if stand_in.done():
        return
    exc = ray_future.exception()
    with contextlib.suppress(Exception):  # cancelled under us
        if exc is not None:
            stand_in.set_exception(exc)
        else:
            stand_in.set_result(ray_future.result())


def _cancel(ref: ray.ObjectRef) -> None:
    try:
        ray.cancel(ref, force=True)
    except Exception:  # finished meanwhile, or Ray is going away
        log.debug("ray.cancel of a chunk failed", exc_info=True)


def _lost(exc: BaseException) -> str:
    """Whatever fails a chunk's Ray task (run_chunk itself never raises) lost
    its worker, its node or its object, for every task in it."""
    if isinstance(exc, WorkerLostError):
        return str(exc)  # Ray itself is gone: the backend's own words
    return (
        f"the Ray worker running its chunk was lost ({type(exc).__name__}: "
        f"{str(exc).splitlines()[0] if str(exc) else exc!r}); use retries= to "
        "re-run such tasks"
    )
