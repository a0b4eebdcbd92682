"""Engine behaviour that is not an adapter's promise: construction, declaration
errors, routing between backends, ownership at shutdown, memory, remote values."""

from __future__ import annotations

import asyncio
import gc
import os
import subprocess
import sys
import threading
import weakref
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from asyncflow import (
    BackendInfo,
    Capabilities,
    Capability,
    CompletionSink,
    ConcurrentExecutionBackend,
    EngineClosedError,
    RemoteValue,
    TaskDefinitionError,
    TaskSpec,
    WorkflowEngine,
    available_backends,
)
from asyncflow.conformance import tasks as t

pytestmark = pytest.mark.timeout(60)


def threads() -> ConcurrentExecutionBackend:
    return ConcurrentExecutionBackend(ThreadPoolExecutor(2))


# -- construction ---------------------------------------------------------------
def test_constructed_outside_a_loop_then_used_inside_one() -> None:
    flow = WorkflowEngine(backend=threads())
    inc = flow.function_task(t.inc)

    async def main() -> int:
        try:
            return await inc(inc(1))
        finally:
            await flow.shutdown()

    assert asyncio.run(main()) == 3


async def test_create_and_async_with() -> None:
    flow = await WorkflowEngine.create(backend=threads())
    assert await flow.function_task(t.inc)(1) == 2
    await flow.shutdown()
    async with WorkflowEngine(backend=threads()) as flow2:
        assert await flow2.function_task(t.inc)(2) == 3
    with pytest.raises(EngineClosedError):
        flow2.function_task(t.inc)(1)


async def test_default_backend_is_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ASYNCFLOW_BACKEND", raising=False)
    async with WorkflowEngine() as flow:
        (backend,) = flow.backends.values()
        assert backend.info.name == "concurrent-threads"


async def test_default_backend_from_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ASYNCFLOW_BACKEND", "processes")
    monkeypatch.setenv("ASYNCFLOW_BACKEND_OPTIONS", '{"max_workers": 2}')
    async with WorkflowEngine() as flow:
        (backend,) = flow.backends.values()
        assert backend.info.name == "concurrent-processes"
        assert await flow.function_task(t.inc)(1) == 2
    monkeypatch.setenv("ASYNCFLOW_BACKEND", "no-such-backend")
    with pytest.raises(TaskDefinitionError, match="unknown backend 'no-such-backend'"):
        WorkflowEngine()


def test_an_allocation_for_a_backend_without_batch_jobs_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ASYNCFLOW_BACKEND", "threads")
    monkeypatch.setenv("ASYNCFLOW_HPC", '{"resource": "slurm", "nodes": 2}')
    with pytest.raises(TaskDefinitionError, match="'threads' takes no HPC alloc.*dask"):
        WorkflowEngine()
    monkeypatch.setenv("ASYNCFLOW_HPC", '["slurm"]')
    with pytest.raises(TaskDefinitionError, match="ASYNCFLOW_HPC must be a JSON obj"):
        WorkflowEngine()


class _Adapter:
    """The five members, doing nothing: the protocol check only reads them."""

    info = BackendInfo("fake", "none", "0", Capabilities.of())

    async def start(self, sink: CompletionSink) -> None: ...

    def submit(self, specs: Sequence[TaskSpec]) -> None: ...

    def cancel(self, uids: Sequence[str]) -> None: ...

    async def shutdown(self) -> None: ...


def _without(member: str) -> Any:
    namespace = {k: v for k, v in vars(_Adapter).items() if k != member}
    return type(f"No{member.title()}", (), namespace)()


@pytest.mark.parametrize("member", ["info", "start", "submit", "cancel", "shutdown"])
def test_protocol_check_names_the_missing_member(member: str) -> None:
    paren = "" if member == "info" else r"\(\)"
    with pytest.raises(TaskDefinitionError) as err:
        WorkflowEngine(backend={"mine": _without(member)})
    assert err.match(rf"backend 'mine' .*: lacks {member}{paren}\.  An adapter has")
    assert str(err.value).count("lacks") == 1


def test_protocol_check_says_what_is_wrong_with_a_member() -> None:
    class Wrong(_Adapter):
        submit = "not a method"

        def start(self, sink: CompletionSink) -> None:  # type: ignore[override]
            pass

    with pytest.raises(TaskDefinitionError) as err:
        WorkflowEngine(backend=Wrong())
    assert err.match(r"start\(\) is not async \(the engine awaits it\); ")
    assert err.match(r"submit is a str, not a method\.")


def test_protocol_check_accepts_wrapped_and_callable_object_methods() -> None:
    import functools

    class Wrapped(_Adapter):
        @functools.wraps(_Adapter.shutdown)
        def shutdown(self) -> Any:  # type: ignore[override]
            return _Adapter.shutdown(self)

    class Starter:
        async def __call__(self, sink: CompletionSink) -> None: ...

    wrapped = Wrapped()
    wrapped.start = Starter()  # type: ignore[method-assign]
    WorkflowEngine(backend=wrapped)
    WorkflowEngine(backend=_Adapter())


def test_calling_a_task_outside_a_loop_is_a_clear_error() -> None:
    flow = WorkflowEngine(backend=threads())
    with pytest.raises(
        TaskDefinitionError, match="'inc'.*outside a running event loop"
    ):
        flow.function_task(t.inc)(1)
    asyncio.run(flow.shutdown())


# -- declaration errors ------------------------------------------------------------
async def test_declaration_errors_name_the_task() -> None:
    async with WorkflowEngine(backend=threads()) as flow:
        with pytest.raises(TaskDefinitionError, match="needs a function.*42"):
            flow.function_task(42)
        with pytest.raises(TaskDefinitionError, match="'inc'.*retries="):
            flow.function_task(retries=-1)(t.inc)
        with pytest.raises(TaskDefinitionError, match="'inc'.*timeout="):
            flow.function_task(timeout=0)(t.inc)
        with pytest.raises(TaskDefinitionError, match="'inc'.*unknown resource"):
            flow.function_task(resources={"cpus": 2})(t.inc)
        with pytest.raises(TaskDefinitionError, match="'inc'.*unknown backend 'hpc'"):
            flow.function_task(backend="hpc")(t.inc)

        def job() -> str:
            return "true"

        with pytest.raises(TaskDefinitionError, match=r"'job'.*str\(\).*'N'=3"):
            flow.executable_task(env={"N": 3})(job)

        @flow.executable_task
        def run() -> int:
            return 7

        with pytest.raises(TaskDefinitionError, match="'run' must return a command"):
            await run()


async def test_executable_body_may_return_a_command_object(tmp_path: Any) -> None:
    from asyncflow import Command

    async with WorkflowEngine(backend=threads()) as flow:

        @flow.executable_task
        def where(d: str) -> Command:
            return Command(["pwd"], cwd=d)

        assert (await where(str(tmp_path))).strip() == str(tmp_path)


# -- several backends ---------------------------------------------------------------
class Recording(ConcurrentExecutionBackend):
    def __init__(self) -> None:
        super().__init__(ThreadPoolExecutor(2))
        self.submitted: list[str] = []
        self.specs: list[TaskSpec] = []
        self.cancelled: list[str] = []

    def submit(self, specs: Sequence[TaskSpec]) -> list[str]:
        self.submitted += [s.name for s in specs]
        self.specs += specs
        return super().submit(specs)

    def cancel(self, uids: Sequence[str]) -> None:
        self.cancelled += list(uids)
        super().cancel(uids)


@pytest.mark.parametrize(
    ("engine", "task", "expected"),
    [(True, True, True), (True, False, False), (False, True, False)],
)
async def test_chunking_can_be_turned_off_per_engine_or_per_task(
    engine: bool, task: bool, expected: bool
) -> None:
    backend = Recording()
    async with WorkflowEngine(backend, chunking=engine) as flow:
        assert await flow.function_task(chunk=task)(t.inc)(1) == 2
    assert [s.chunk for s in backend.specs] == [expected]


async def test_chunk_must_be_a_bool() -> None:
    async with WorkflowEngine(backend=threads()) as flow:
        with pytest.raises(TaskDefinitionError, match="chunk= must be True or False"):
            flow.function_task(chunk="no")(t.inc)


async def test_routing_between_named_backends() -> None:
    local, hpc = Recording(), Recording()
    async with WorkflowEngine(backend={"local": local, "hpc": hpc}) as flow:
        inc = flow.function_task(t.inc)
        remote_wait = flow.function_task(backend="hpc")(t.gate_wait)
        from asyncflow.conformance import Gate

        async with Gate() as gate:
            held = remote_wait(gate.address, "h")
            assert await inc(1) == 2
            await gate.arrived("h")
            held.cancel()
        assert local.submitted == ["inc"] and hpc.submitted == ["gate_wait"]
        assert hpc.cancelled == [held.uid] and local.cancelled == []


async def test_task_cancelled_before_the_batch_goes_out_is_never_submitted() -> None:
    """Submissions go to the backend once per loop turn; cancelling a task in
    the turn that made it must keep it out of that batch (it used to run,
    unseen, with its result dropped)."""
    backend = Recording()
    async with WorkflowEngine(backend=backend) as flow:
        inc = flow.function_task(t.inc)
        doomed, kept = inc(1), inc(2)
        assert doomed.cancel()
        assert await kept == 3
        with pytest.raises(asyncio.CancelledError):
            await doomed
        assert backend.submitted == ["inc"]


# -- ownership at shutdown ----------------------------------------------------
async def test_engine_shuts_down_the_executor_it_was_given() -> None:
    ex = ThreadPoolExecutor(2)
    async with WorkflowEngine(backend=ConcurrentExecutionBackend(ex)) as flow:
        await flow.function_task(t.inc)(1)
    with pytest.raises(RuntimeError):
        ex.submit(t.inc, 1)


async def test_shared_executor_survives_when_asked() -> None:
    ex = ThreadPoolExecutor(2)
    backend = ConcurrentExecutionBackend(ex, shutdown_executor=False)
    async with WorkflowEngine(backend=backend) as flow:
        await flow.function_task(t.inc)(1)
    assert ex.submit(t.inc, 1).result() == 2
    ex.shutdown()


# -- memory -----------------------------------------------------------------------
async def test_finished_tasks_are_not_retained() -> None:
    async with WorkflowEngine(backend=threads()) as flow:
        inc = flow.function_task(t.inc)
        first = inc(1)
        last = inc(first)
        assert await last == 3
        refs = [weakref.ref(first), weakref.ref(last)]
        del first, last
        await asyncio.sleep(0)  # let the loop drop its last wake-up handle
        gc.collect()
        assert [r() for r in refs] == [None, None]
        assert not flow._state.open and not flow._state.inflight


# -- remote values: data stays in the runtime until someone awaits it --------------
class Remote(RemoteValue):
    async def fetch(self) -> Any:
        self.owner.fetched.append(self.handle)
        return self.owner.store[self.handle]


class KeepsResults:
    """A minimal adapter whose results stay 'in the runtime' (a dict)."""

    def __init__(self) -> None:
        self.store: dict[str, Any] = {}
        self.fetched: list[str] = []
        self.seen_args: list[tuple[Any, ...]] = []
        self.info = BackendInfo(
            "keeps", "dict", "0", Capabilities.of(Capability.FUNCTIONS)
        )

    async def start(self, sink: CompletionSink) -> None:
        self.sink = sink

    def submit(self, specs: Sequence[TaskSpec]) -> None:
        for spec in specs:
            self.seen_args.append(spec.args)
            args = [
                self.store[a.handle] if isinstance(a, Remote) else a for a in spec.args
            ]
            assert spec.function is not None
            self.store[spec.uid] = spec.function(*args)
            self.sink.set_result(spec.uid, Remote(self, spec.uid))

    def cancel(self, uids: Sequence[str]) -> None:
        pass

    async def shutdown(self) -> None:
        pass


async def test_remote_values_pass_between_tasks_without_fetching() -> None:
    backend = KeepsResults()
    async with WorkflowEngine(backend={"keeps": backend, "local": threads()}) as flow:
        inc = flow.function_task(t.inc)
        local_inc = flow.function_task(backend="local")(t.inc)
        first = inc(1)
        second = inc(first)
        assert await second == 3
        assert backend.fetched == [second.uid], "only the awaited value was fetched"
        assert isinstance(backend.seen_args[1][0], Remote)
        with pytest.raises(asyncio.InvalidStateError, match="await"):
            first.result()
        assert await local_inc(first) == 3, "another backend gets the fetched value"
        assert first.uid in backend.fetched


def test_no_runtime_is_imported_by_import_asyncflow() -> None:
    code = (
        "import sys, asyncflow; "
        "print([m for m in ('distributed','ray','parsl','radical.pilot') "
        "if m in sys.modules])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"


def test_missing_runtime_names_the_extra() -> None:
    code = (
        "import sys; sys.modules['distributed'] = None; import asyncflow\n"
        "try:\n    asyncflow.DaskExecutionBackend()\n"
        "except asyncflow.BackendNotInstalledError as e:\n    print(e)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ},
    ).stdout
    assert "pip install 'asyncflow[dask]'" in out


def test_available_backends_lists_every_adapter() -> None:
    names = {s.name: s for s in available_backends()}
    assert {"threads", "processes", "dask", "ray", "parsl", "radical"} <= set(names)
    assert names["threads"].installed
    assert names["dask"].install_hint == "pip install 'asyncflow[dask]'"


async def test_calling_from_another_thread_is_a_clear_error() -> None:
    async with WorkflowEngine(backend=threads()) as flow:
        inc = flow.function_task(t.inc)
        assert await inc(0) == 1
        errors: list[BaseException] = []

        def other() -> None:
            try:
                inc(1)
            except BaseException as exc:
                errors.append(exc)

        th = threading.Thread(target=other)
        th.start()
        th.join()
        assert isinstance(errors[0], TaskDefinitionError)
