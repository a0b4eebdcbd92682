"""radical.asyncflow's API on our engine: what its scripts write works here.

Backends are real (thread pools, and radical.pilot's adapter object where only
its declared runtime matters); nothing here is mocked.
"""

from __future__ import annotations

import asyncio
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from asyncflow import (
    ConcurrentExecutionBackend,
    DependencyFailureError,
    ExecutableFailedError,
    LocalExecutionBackend,
    ResourceUnavailableError,
    TaskDefinitionError,
    WorkflowEngine,
)
from asyncflow.adapters.concurrent import process_backend
from asyncflow.adapters.noop import NoopExecutionBackend
from asyncflow.data import InputFile, OutputFile
from asyncflow.events import EventKind
from asyncflow.logging import init_default_logger

pytestmark = pytest.mark.timeout(60)


def threads(n: int = 2) -> ConcurrentExecutionBackend:
    return ConcurrentExecutionBackend(ThreadPoolExecutor(n))


def run(coro: Any) -> Any:
    return asyncio.run(coro)


# -- errors in the peer's shapes ----------------------------------------------------
def test_dependency_failure_has_failed_dependencies_and_root_cause() -> None:
    async def main() -> None:
        async with WorkflowEngine(threads()) as flow:

            @flow.function_task
            def boom() -> None:
                raise KeyError("the root")

            @flow.function_task
            def middle(x: Any) -> Any:
                return x

            first = boom()
            with pytest.raises(DependencyFailureError) as info:
                await middle(middle(first))
            assert isinstance(info.value.root_cause, KeyError)
            assert info.value.failed_dependencies == [info.value.upstream[0]]
            assert info.value.failed_dependencies[0].startswith("middle.")
            with pytest.raises(KeyError):
                await first

    run(main())


def test_failed_executable_is_a_runtime_error() -> None:
    async def main() -> None:
        async with WorkflowEngine(threads()) as flow:
            fails = flow.executable_task(lambda: "echo out; exit 3")
            with pytest.raises(RuntimeError) as info:
                await fails()
            assert isinstance(info.value, ExecutableFailedError)
            assert info.value.exit_code == 3

    run(main())


def test_shutdown_can_leave_the_backend_running() -> None:
    pool = ThreadPoolExecutor(2)
    backend = ConcurrentExecutionBackend(pool)

    async def main() -> None:
        flow = WorkflowEngine(backend)
        assert await flow.function_task(lambda: 1)() == 1
        await flow.shutdown(skip_execution_backend=True)
        assert pool.submit(lambda: "still up").result(10) == "still up"
        await backend.shutdown()
        with pytest.raises(RuntimeError):
            pool.submit(lambda: None)

    run(main())


# -- create(), dry runs and the no-op backend ------------------------------------------
def test_dry_run_resolves_in_dependency_order_without_running(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    given = threads()

    async def main() -> list[tuple[str, str]]:
        flow = await WorkflowEngine.create(backend=given, dry_run=True)
        order: list[tuple[str, str]] = []
        flow.subscribe(lambda ev: order.append((ev.kind.value, ev.uid)))
        touch = flow.function_task(lambda *_: marker.write_text("x"))
        command = flow.executable_task(lambda x: f"touch {marker}")
        a = touch()
        b = command(a)
        c = touch(b)
        assert (await a, await b, await c) == (None, "", None)
        await flow.shutdown()
        return order

    order = run(main())
    assert not marker.exists(), "a dry run ran a task"
    done = [uid for kind, uid in order if kind == EventKind.DONE.value]
    assert [u.split(".")[0] for u in done] == ["<lambda>"] * 3
    submitted = [uid for kind, uid in order if kind == EventKind.SUBMITTED.value]
    for upstream, downstream in zip(done, submitted[1:], strict=False):
        assert order.index(("done", upstream)) < order.index(("submitted", downstream))
    assert given._executor.submit(lambda: 1).result(10) == 1, "left untouched"
    run(given.shutdown())


def test_create_without_backend_in_dry_run_is_the_noop_backend() -> None:
    async def main() -> None:
        flow = await WorkflowEngine.create(dry_run=True, implicit_data=False)
        (backend,) = flow.backends.values()
        assert isinstance(backend, NoopExecutionBackend)
        assert flow.implicit_data is False and flow.dry_run is True
        await flow.shutdown()

    run(main())


def test_a_list_of_backends_is_named_by_their_info() -> None:
    async def main() -> None:
        flow = WorkflowEngine([threads(), process_backend(1)])
        try:
            assert list(flow.backends) == ["concurrent-threads", "concurrent-processes"]
            getpid = flow.function_task(backend="concurrent-processes")(os.getpid)
            assert await getpid() != os.getpid()
        finally:
            await flow.shutdown()

    run(main())


def test_two_backends_of_one_name_in_a_list_are_refused() -> None:
    a, b = threads(), threads()
    with pytest.raises(TaskDefinitionError, match="named 'concurrent-threads'"):
        WorkflowEngine([a, b])
    run(a.shutdown())
    run(b.shutdown())


# -- task_description ---------------------------------------------------------------
def test_task_description_is_never_passed_to_the_function() -> None:
    async def main() -> None:
        async with WorkflowEngine(threads()) as flow:

            @flow.function_task(task_description={"cores_per_rank": 1})
            def seen(**kwargs: Any) -> dict[str, Any]:
                return kwargs

            @flow.function_task
            def own_default(task_description: dict[str, Any] | None = None) -> Any:
                return task_description

            assert await seen(a=1, task_description={"ranks": 1}) == {"a": 1}
            assert await own_default() is None

    run(main())


def test_task_description_resources_reach_the_backend() -> None:
    """The thread adapter refuses more cores than it has: the request arrived."""

    async def main() -> None:
        async with WorkflowEngine(threads(2)) as flow:

            @flow.function_task(task_description={"cores_per_rank": 64})
            def greedy() -> int:
                return 1

            @flow.function_task
            def modest(task_description: dict[str, int] = {"cores": 64}) -> int:  # noqa: B006
                return 1

            with pytest.raises(ResourceUnavailableError, match="greedy"):
                await greedy()
            with pytest.raises(ResourceUnavailableError, match="modest"):
                await modest()
            # the call's description overrides the decorator's, key by key
            assert await greedy(task_description={"cores_per_rank": 1}) == 1

    run(main())


def test_task_description_environment_and_cwd_reach_a_command(tmp_path: Path) -> None:
    async def main() -> str:
        async with WorkflowEngine(threads()) as flow:
            show = flow.executable_task(lambda: 'echo "$GREETING" "$(pwd)"')
            return await show(
                task_description={
                    "environment": {"GREETING": "hi"},
                    "cwd": str(tmp_path),
                }
            )

    assert run(main()).split() == ["hi", str(tmp_path)]


def test_unknown_task_description_key_names_key_and_backend() -> None:
    flow = WorkflowEngine(threads())
    with pytest.raises(
        TaskDefinitionError, match=r"\['pre_exec'\].*concurrent-threads"
    ):
        flow.function_task(task_description={"pre_exec": ["module load x"]})(print)
    with pytest.raises(TaskDefinitionError, match="must be a dict"):
        flow.function_task(print)(task_description=["ranks"])
    run(flow.shutdown())


# -- data declarations and logging -------------------------------------------------
def test_output_file_orders_its_readers(tmp_path: Path) -> None:
    data = tmp_path / "data.txt"

    async def main() -> str:
        async with WorkflowEngine(threads(2)) as flow:
            write = flow.executable_task(lambda out: f"sleep 0.2; echo written > {out}")
            read = flow.executable_task(lambda src: f"cat {src}")
            write(OutputFile(data))
            return await read(InputFile(data))

    assert run(main()).strip() == "written"


def test_input_file_of_a_failed_writer_fails_the_reader(tmp_path: Path) -> None:
    async def main() -> None:
        async with WorkflowEngine(threads()) as flow:
            write = flow.executable_task(lambda out: "exit 1")
            read = flow.executable_task(lambda src: f"cat {src}")
            write(OutputFile(tmp_path / "x"))
            with pytest.raises(DependencyFailureError):
                await read(InputFile(tmp_path / "x"))

    run(main())


def test_remote_urls_are_refused_with_what_to_do() -> None:
    with pytest.raises(TaskDefinitionError, match="download the file first"):
        InputFile("https://example.org/data.csv")
    assert os.fspath(InputFile("file:///tmp/x")) == "/tmp/x"


def test_init_default_logger_writes_console_file_and_json(tmp_path: Path) -> None:
    name = "migration-test-logger"
    logger = init_default_logger(
        logging.DEBUG,
        logger_name=name,
        output_file=tmp_path / "run.log",
        structured_file=tmp_path / "run.jsonl",
        clear_handlers=True,
    )
    try:
        logger.info("hello %s", "there")
        for h in logger.handlers:
            h.flush()
        assert "hello there" in (tmp_path / "run.log").read_text()
        assert '"message": "hello there"' in (tmp_path / "run.jsonl").read_text()
    finally:
        for h in list(logger.handlers):
            logger.removeHandler(h)
            h.close()


def test_local_execution_backend_is_the_peers_name_for_threads() -> None:
    async def main() -> None:
        local = await LocalExecutionBackend(ThreadPoolExecutor(1), name="local")
        flow = WorkflowEngine([local, threads()])
        try:
            assert list(flow.backends) == ["local", "concurrent-threads"]
            assert await flow.function_task(backend="local")(lambda: 7)() == 7
        finally:
            await flow.shutdown()

    run(main())
