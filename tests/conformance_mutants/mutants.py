"""One broken promise per class, over adapters that keep them all.

``Threads``, ``Processes`` and ``Example`` are the correct adapters; every other
class is a mutant: a plausible bug, small enough to read at a glance.  Each
mutant's ``base`` names the correct adapter it breaks, so the strength test can
show that the same suite test passes there.
"""

from __future__ import annotations

import asyncio
import subprocess
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import replace
from multiprocessing import resource_tracker
from typing import Any

from asyncflow import ConcurrentExecutionBackend, walk
from asyncflow.errors import WorkerLostError
from asyncflow.protocol import (
    BackendInfo,
    Capabilities,
    Capability,
    CompletionSink,
    UpstreamRef,
)
from asyncflow.spec import TaskSpec
from asyncflow_example import AsyncioBackend


class _Relay:
    """A sink that passes every report on; a mutant overrides one method."""

    def __init__(self, sink: CompletionSink):
        self.sink = sink

    def set_result(self, uid: str, value: Any) -> None:
        self.sink.set_result(uid, value)

    def set_exception(self, uid: str, exc: BaseException) -> None:
        self.sink.set_exception(uid, exc)

    def set_running(self, uid: str) -> None:
        self.sink.set_running(uid)

    def set_backend_state(self, backend: object, state: str, detail: str) -> None:
        self.sink.set_backend_state(backend, state, detail)


class Threads(ConcurrentExecutionBackend):
    """Correct: the thread adapter, reporting through ``relay``."""

    base = "Threads"
    relay: type[_Relay] = _Relay

    def __init__(self) -> None:
        super().__init__(ThreadPoolExecutor(2))

    async def start(self, sink: CompletionSink) -> None:
        await super().start(self.relay(sink))


class Processes(Threads):
    """Correct: the process-pool adapter."""

    base = "Processes"

    def __init__(self) -> None:
        ConcurrentExecutionBackend.__init__(self, ProcessPoolExecutor(2))


def Example() -> AsyncioBackend:
    """Correct: the README's example adapter."""
    return AsyncioBackend(max_workers=2)


# -- each spec reported exactly once ---------------------------------------------------
class _Twice(_Relay):
    def set_result(self, uid: str, value: Any) -> None:
        self.sink.set_result(uid, value)
        self.sink.set_result(uid, value)


class DoubleResult(Threads):
    relay = _Twice


class _LateError(_Relay):
    def set_result(self, uid: str, value: Any) -> None:
        self.sink.set_result(uid, value)
        self.sink.set_exception(uid, RuntimeError("cleanup failed"))


class ErrorAfterResult(Threads):
    relay = _LateError


# -- dependents of a failure never run -------------------------------------------------
class RunsPipedEarly(Threads):
    """Starts a piped task at once, with None for its upstreams' values."""

    def submit(self, specs: Sequence[TaskSpec]) -> None:
        def unpipe(s: TaskSpec) -> TaskSpec:
            args = walk.replace(s.args, UpstreamRef, lambda ref: None)
            return replace(s, args=args, has_remote_args=False)

        super().submit([unpipe(s) if s.has_remote_args else s for s in specs])


class ForgetsRefused(Threads):
    """Refuses a piped spec whose upstream is gone but does not say so."""

    def submit(self, specs: Sequence[TaskSpec]) -> None:
        super().submit(specs)


# -- a killed worker is WorkerLostError, and the backend goes on -----------------------
class _Generic(_Relay):
    def set_exception(self, uid: str, exc: BaseException) -> None:
        if isinstance(exc, WorkerLostError):
            exc = RuntimeError(str(exc))
        self.sink.set_exception(uid, exc)


class LostAsRuntimeError(Processes):
    relay = _Generic


class KeepsBrokenPool(Processes):
    def _replace_broken_pool(self) -> None:
        pass  # the pool a dead worker broke stays in use


# -- failures reported promptly --------------------------------------------------------
class _Slow(_Relay):
    def set_exception(self, uid: str, exc: BaseException) -> None:
        timer = threading.Timer(60, self.sink.set_exception, (uid, exc))
        timer.daemon = True
        timer.start()  # e.g. failures only collected by a periodic sweep


class SlowFailureReport(Threads):
    relay = _Slow


# -- start() and submit() never block the loop -----------------------------------------
class BlockingSubmit(Threads):
    def submit(self, specs: Sequence[TaskSpec]) -> None:
        super().submit(specs)
        time.sleep(2)  # a synchronous round trip to the runtime


class BlockingStart(Threads):
    async def start(self, sink: CompletionSink) -> None:
        time.sleep(2)  # connects to the runtime without a thread
        await super().start(sink)


# -- shutdown --------------------------------------------------------------------------
class WaitsForStuckWork(Processes):
    def _abandon(self, f: Future[Any]) -> None:
        pass  # so shutdown waits for a running function instead of killing it


class LeavesAProcess(Threads):
    """Starts a helper process with the runtime and never stops it."""

    async def start(self, sink: CompletionSink) -> None:
        await super().start(sink)
        self.helper = subprocess.Popen(["sleep", "300"])


class UsesResourceTracker(Threads):
    """Correct: the first in this interpreter to need multiprocessing's
    resource tracker, which then lives as long as the interpreter."""

    async def start(self, sink: CompletionSink) -> None:
        await super().start(sink)
        resource_tracker.ensure_running()


class ShutdownNeedsStart(Threads):
    """Assumes shutdown() follows start()."""

    async def shutdown(self) -> None:
        assert self._sink is not None, "shutdown() before start()"
        await super().shutdown()


class ShutdownRaisesTwice(Threads):
    async def shutdown(self) -> None:
        if self._closed:
            raise RuntimeError("already shut down")
        await super().shutdown()


class ShutdownHangsTwice(Threads):
    async def shutdown(self) -> None:
        if self._closed:
            await asyncio.Event().wait()  # waits for a close that happened
        await super().shutdown()


# -- REPORTS_RUNNING declared and honoured ----------------------------------------
class _Quiet(_Relay):
    def set_running(self, uid: str) -> None:
        pass


class SilentStart(Threads):
    """Declares REPORTS_RUNNING (as the thread adapter does) but never reports."""

    relay = _Quiet


# -- a cancelled queued task never runs ------------------------------------------------
class RunsCancelledQueued(Threads):
    """Forgets a cancel that arrives before the task started."""

    def cancel(self, uids: Sequence[str]) -> None:
        pass


# -- CANCEL_RUNNING declared and honoured ----------------------------------------------
class IgnoresCancelRunning(AsyncioBackend):
    """Declares CANCEL_RUNNING, but a cancelled thread runs on."""

    base = "Example"

    def __init__(self) -> None:
        super().__init__(max_workers=2)
        info: BackendInfo = vars(self)["info"]  # set by the example's __init__
        supported = info.capabilities.supported | {Capability.CANCEL_RUNNING}
        self.info = replace(info, capabilities=Capabilities(supported))
