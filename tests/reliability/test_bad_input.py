"""Bad input gets one clear error naming the task, at the earliest point."""

from __future__ import annotations

import os
import signal
import sys
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import pytest

from asyncflow import (
    ConcurrentExecutionBackend,
    ExecutableFailedError,
    SerializationError,
    TaskDefinitionError,
    TaskInterruptedError,
    WorkerLostError,
    WorkflowEngine,
)
from asyncflow.conformance import tasks as t

pytestmark = pytest.mark.timeout(120)


def exit_now(code: int) -> None:
    sys.exit(code)


def interrupt() -> None:
    raise KeyboardInterrupt


def die(marker: str) -> str:
    """Kill this worker process the first time; succeed after."""
    if not os.path.exists(marker):
        open(marker, "w").close()
        os.kill(os.getpid(), signal.SIGKILL)
    return "survived"


def make_lock() -> object:
    import threading

    return threading.Lock()


@pytest.fixture(params=["threads", "processes"])
def backend(request: pytest.FixtureRequest) -> ConcurrentExecutionBackend:
    if request.param == "threads":
        return ConcurrentExecutionBackend(ThreadPoolExecutor(2))
    return ConcurrentExecutionBackend(ProcessPoolExecutor(2))


async def test_system_exit_and_ctrl_c_inside_a_task(backend) -> None:  # type: ignore[no-untyped-def]
    async with WorkflowEngine(backend=backend) as flow:
        with pytest.raises(TaskInterruptedError, match="'exit_now'.*SystemExit"):
            await flow.function_task(exit_now)(4)
        with pytest.raises(
            TaskInterruptedError, match="'interrupt'.*KeyboardInterrupt"
        ):
            await flow.function_task(interrupt)()
        assert await flow.function_task(t.inc)(1) == 2, "the engine lives on"


async def test_missing_cwd_and_missing_command(backend, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    async with WorkflowEngine(backend=backend) as flow:
        where = flow.executable_task(cwd=str(tmp_path / "nope"))(lambda: "pwd")
        with pytest.raises(
            TaskDefinitionError, match="'<lambda>'.*cwd.*does not exist"
        ):
            await where()
        missing = flow.executable_task(lambda: "no-such-program-xyz --flag")
        with pytest.raises(ExecutableFailedError) as info:
            await missing()
        assert info.value.exit_code == 127 and "not found" in info.value.stderr


async def test_unserialisable_result_on_processes() -> None:
    backend = ConcurrentExecutionBackend(ProcessPoolExecutor(2))
    async with WorkflowEngine(backend=backend) as flow:
        with pytest.raises(SerializationError, match="'make_lock'"):
            await flow.function_task(make_lock)()
        import threading

        with pytest.raises(SerializationError, match="'inc'"):
            await flow.function_task(t.inc)(threading.Lock())
        assert await flow.function_task(t.inc)(1) == 2


async def test_dead_process_worker_is_worker_lost_and_pool_recovers(
    tmp_path: Path,
) -> None:
    backend = ConcurrentExecutionBackend(ProcessPoolExecutor(2))
    async with WorkflowEngine(backend=backend) as flow:
        with pytest.raises(WorkerLostError, match="'die'"):
            await flow.function_task(die)(str(tmp_path / "once"))
        assert await flow.function_task(t.inc)(1) == 2, "the workflow goes on"
        retried = flow.function_task(retries=1)(die)
        assert await retried(str(tmp_path / "twice")) == "survived"


def shout() -> str:
    return "echo hi"


async def test_output_options_are_checked_where_declared(tmp_path: Path) -> None:
    async with WorkflowEngine() as flow:
        for bad, says in (
            ({"text": "yes"}, "text= must be True"),
            ({"output_limit": -1}, "output_limit= must be"),
            ({"stdout": 3}, "stdout= must be a file path"),
        ):
            with pytest.raises(TaskDefinitionError, match=f"'shout'.*{says}"):
                flow.executable_task(**bad)(shout)
        with pytest.raises(TaskDefinitionError, match="'inc'.*for executable tasks"):
            flow.function_task(stdout="out.txt")(t.inc)
        lost = tmp_path / "no-such-dir" / "out.txt"
        lost_task = flow.executable_task(stdout=lost)(shout)
        with pytest.raises(TaskDefinitionError, match="'shout'.*cannot write stdout="):
            await lost_task()


async def test_round_two(backend, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Metacharacters and non-ASCII stay literal in list form; env values must
    be strings; a generator or an open file cannot travel to a process; a
    daemon a command forks goes when the command ends."""
    import psutil

    async with WorkflowEngine(backend=backend) as flow:
        words = ["a;b", "$HOME", "`id`", "ü€", "*", "'q'"]
        literal = flow.executable_task(lambda: ["printf", "%s|", *words])
        assert await literal() == "|".join(words) + "|"
        with pytest.raises(TaskDefinitionError, match="'shout'.*env"):
            flow.executable_task(env={"N": 1})(shout)
        ident = flow.function_task(t.pack)
        if backend.info.name.endswith("processes"):
            with pytest.raises(SerializationError, match="pack"):
                await ident(i for i in range(3))
            with (
                open(tmp_path / "f", "w") as handle,
                pytest.raises(SerializationError, match="pack"),
            ):
                await ident(handle)
        daemon = flow.executable_task(lambda: "sleep 300 & echo $!")
        pid = int(await daemon())
        with pytest.raises(psutil.NoSuchProcess):
            psutil.Process(pid).wait(10)  # killed with its command, then reaped
            raise psutil.NoSuchProcess(pid)


async def test_a_task_body_calling_tasks_is_told_what_to_do() -> None:
    async with WorkflowEngine() as flow:
        inc = flow.function_task(t.inc)

        def calls_back(x: int) -> object:
            return inc(x)

        with pytest.raises(TaskDefinitionError, match="'inc'.*@flow.block"):
            await flow.function_task(calls_back)(1)
