"""The engine's side of Capability.PIPELINE, driven step by step.

The adapter here is a hand-cranked protocol implementation, not a runtime: each
test decides in which order reports arrive, which real runtimes only do by
chance.  (Dask and Ray run the same promises for real in the conformance
suite's PipelineTests.)
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest

from asyncflow import (
    BackendInfo,
    Capabilities,
    Capability,
    CompletionSink,
    DependencyFailureError,
    TaskSpec,
    TaskState,
    WorkflowEngine,
)
from asyncflow.protocol import UpstreamRef

pytestmark = pytest.mark.timeout(30)


class Cranked:
    info = BackendInfo(
        "cranked",
        "none",
        "0",
        Capabilities.of(Capability.FUNCTIONS, Capability.PIPELINE),
    )

    def __init__(self) -> None:
        self.specs: dict[str, TaskSpec] = {}
        self.cancelled: list[str] = []
        self.refuse: set[str] = set()  # task names whose piped specs are refused
        self.arrived = asyncio.Event()

    async def start(self, sink: CompletionSink) -> None:
        self.sink = sink

    def submit(self, specs: Sequence[TaskSpec]) -> list[str]:
        refused = []
        for spec in specs:
            if spec.name in self.refuse and spec.has_remote_args:
                refused.append(spec.uid)  # "its upstream is no longer here"
            else:
                self.specs[spec.name] = spec
        self.arrived.set()
        return refused

    def cancel(self, uids: Sequence[str]) -> None:
        self.cancelled.extend(uids)

    async def shutdown(self) -> None:
        pass

    async def spec(self, name: str) -> TaskSpec:
        while name not in self.specs:
            self.arrived.clear()
            await self.arrived.wait()
        return self.specs.pop(name)


def up() -> int:
    return 1


def down(x: int) -> int:
    return x + 1


async def _pair(
    backend: Cranked | None = None,
) -> tuple[WorkflowEngine, Cranked, Any, Any]:
    backend = backend or Cranked()
    flow = WorkflowEngine(backend=backend)
    await flow.start()
    a = flow.function_task(up)()
    b = flow.function_task(down)(a)
    return flow, backend, a, b


async def test_piped_spec_names_its_running_upstream() -> None:
    flow, backend, a, b = await _pair()
    sa, sb = await backend.spec("up"), await backend.spec("down")
    assert b.state is TaskState.SUBMITTED
    (ref,) = sb.args
    assert isinstance(ref, UpstreamRef) and ref.uid == sa.uid and sb.has_remote_args
    backend.sink.set_result(sb.uid, 2)  # the runtime reports the downstream first
    backend.sink.set_result(sa.uid, 1)
    order: list[str] = []
    a.add_done_callback(lambda _: order.append("up"))
    b.add_done_callback(lambda _: order.append("down"))
    assert await b == 2 and await a == 1
    assert order == ["up", "down"], "reports are held back until upstreams finish"
    await flow.shutdown()


async def test_downstream_error_before_upstream_failure() -> None:
    flow, backend, _a, b = await _pair()
    sa, sb = await backend.spec("up"), await backend.spec("down")
    backend.sink.set_exception(sb.uid, KeyError("the runtime's copy"))
    backend.sink.set_exception(sa.uid, ValueError("root"))
    with pytest.raises(DependencyFailureError) as info:
        await b
    assert isinstance(info.value.__cause__, ValueError)
    await flow.shutdown()


async def test_upstream_failure_cancels_the_piped_task_in_the_runtime() -> None:
    flow, backend, _a, b = await _pair()
    sa, sb = await backend.spec("up"), await backend.spec("down")
    backend.sink.set_exception(sa.uid, ValueError("root"))
    with pytest.raises(DependencyFailureError):
        await b
    assert backend.cancelled == [sb.uid]
    await flow.shutdown()


async def test_a_refused_spec_goes_again_with_the_value() -> None:
    backend = Cranked()
    backend.refuse.add("down")
    flow = WorkflowEngine(backend=backend)
    await flow.start()
    a = flow.function_task(up)()
    sa = await backend.spec("up")
    backend.sink.set_result(sa.uid, 41)  # drained before the next submit...
    b = flow.function_task(down)(a)  # ...which still sees a running upstream
    assert b.state is TaskState.SUBMITTED
    again = await backend.spec("down")
    assert again.args == (41,), "resubmitted with the upstream's value"
    assert not again.has_remote_args
    backend.sink.set_result(again.uid, 42)
    assert await b == 42
    await flow.shutdown()


async def test_a_spec_refused_before_its_upstream_reports_waits_for_it() -> None:
    backend = Cranked()
    backend.refuse.add("down")
    flow, _, _a, b = await _pair(backend)
    sa = await backend.spec("up")
    await asyncio.sleep(0)
    assert "down" not in backend.specs and not b.done()
    backend.sink.set_result(sa.uid, 5)
    again = await backend.spec("down")
    assert again.args == (5,)
    backend.sink.set_result(again.uid, 6)
    assert await b == 6
    await flow.shutdown()


async def test_no_pipelining_with_retries_or_timeouts() -> None:
    backend = Cranked()
    flow = WorkflowEngine(backend=backend)
    await flow.start()
    a = flow.function_task(up)()
    b = flow.function_task(retries=1)(down)(a)
    c = flow.function_task(timeout=5)(down)(a)
    assert b.state is TaskState.WAITING and c.state is TaskState.WAITING
    await flow.shutdown()


async def test_a_long_chain_of_held_back_reports_does_not_recurse() -> None:
    backend = Cranked()
    flow = WorkflowEngine(backend=backend)
    await flow.start()
    step = flow.function_task(down)
    first = flow.function_task(up)()
    futs = [first]
    for _ in range(5000):
        futs.append(step(futs[-1]))
    await backend.arrived.wait()
    specs = [f._spec for f in futs]
    for i, spec in reversed(list(enumerate(specs))):  # every downstream first
        backend.sink.set_result(spec.uid, i + 1)
    assert await futs[-1] == 5001
    await flow.shutdown()
