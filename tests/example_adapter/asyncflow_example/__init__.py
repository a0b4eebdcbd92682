"""A complete asyncflow adapter in about 90 lines, built on asyncio alone.

It runs each task in a thread via ``asyncio.to_thread``, at most ``max_workers``
at a time.  It exists to show what an adapter must do and to prove that an
out-of-tree adapter, found through its entry point, passes the conformance suite.
"""

from __future__ import annotations

import asyncio
import platform
from collections.abc import Sequence

from asyncflow import (
    BackendInfo,
    Capabilities,
    Capability,
    CompletionSink,
    ResourceUnavailableError,
    TaskSpec,
)
from asyncflow.commands import kill_command
from asyncflow.worker import run_spec

C = Capability


class AsyncioBackend:
    # on the class, so `asyncflow backends` lists them without starting anything
    CAPABILITIES = Capabilities.of(
        C.FUNCTIONS,
        C.EXECUTABLES,
        C.CANCEL_QUEUED,
        C.KILL_EXECUTABLES,
        C.PARALLEL,
        C.RESOURCES,
        C.LARGE_PAYLOADS,
        cancel_running="a thread cannot be interrupted",
        serializes="runs in the driver process",
        gpus="no GPUs here",
    )

    def __init__(self, max_workers: int = 2):
        self._max_workers = max_workers
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self.info = BackendInfo(
            name="asyncio-example",
            runtime="asyncio",
            runtime_version=platform.python_version(),
            capabilities=self.CAPABILITIES,
        )

    async def start(self, sink: CompletionSink) -> None:
        self._sink = sink
        self._slots = asyncio.Semaphore(self._max_workers)

    def submit(self, specs: Sequence[TaskSpec]) -> None:
        for spec in specs:
            res = spec.resources
            if res.gpus or res.cores > self._max_workers or res.ranks > 1:
                self._sink.set_exception(
                    spec.uid,
                    ResourceUnavailableError(
                        f"task {spec.name!r} asks for {res}; this backend has "
                        f"{self._max_workers} slots and no GPUs"
                    ),
                )
                continue
            self._tasks[spec.uid] = asyncio.ensure_future(self._run(spec))

    async def _run(self, spec: TaskSpec) -> None:
        try:
            async with self._slots:
                value = await asyncio.to_thread(run_spec, spec)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            self._sink.set_exception(spec.uid, exc)
        else:
            self._sink.set_result(spec.uid, value)
        finally:
            self._tasks.pop(spec.uid, None)

    def cancel(self, uids: Sequence[str]) -> None:
        for uid in uids:
            task = self._tasks.pop(uid, None)
            if task is not None:
                task.cancel()
                kill_command(uid)  # a running command dies with its process group

    async def shutdown(self) -> None:
        tasks = list(self._tasks.values())
        self.cancel(list(self._tasks))
        await asyncio.gather(*tasks, return_exceptions=True)
