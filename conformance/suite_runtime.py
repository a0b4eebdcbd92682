"""Mixins for promises that touch the runtime: commands, timeouts, retries,
parallelism, payloads, serialisation and resources.  Cancelling and shutdown
live in :mod:`.suite_lifecycle` and are re-exported here."""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path

import pytest

from .. import (
    ExecutableFailedError,
    OutputDecodeError,
    ResourceUnavailableError,
    SerializationError,
    StdoutFile,
    TaskTimeoutError,
)
from ..engine import WorkflowEngine
from ..protocol import Capability
from . import tasks as t
from .base import scenario
from .gate import Gate
from .suite_lifecycle import CancelTests, ShutdownTests, _dies

C = Capability

__all__ = [
    "CancelTests",
    "ExecutableTests",
    "ParallelTests",
    "PayloadTests",
    "ResourceTests",
    "RetryTests",
    "SerializationTests",
    "ShutdownTests",
    "TimeoutTests",
]


class ExecutableTests:
    @scenario(C.EXECUTABLES)
    async def test_stdout_and_dependency_values(self, flow: WorkflowEngine) -> None:
        @flow.executable_task
        def echo(*words: object) -> str:
            return "echo " + " ".join(map(str, words))

        @flow.executable_task
        async def shout(text: str) -> list[str]:
            return ["printf", "%s!", text.strip()]

        first = echo("hello", 1)
        assert await shout(first) == "hello 1!"
        assert await first == "hello 1\n"

    @scenario(C.EXECUTABLES)
    async def test_list_form_never_uses_a_shell(self, flow: WorkflowEngine) -> None:
        literal = flow.executable_task(lambda: ["echo", "a;b", "$HOME", "`id`", "|"])
        assert await literal() == "a;b $HOME `id` |\n"

    @scenario(C.EXECUTABLES)
    async def test_exit_code_stdout_stderr(self, flow: WorkflowEngine) -> None:
        fail = flow.executable_task(lambda: "echo out; echo err >&2; exit 3")
        with pytest.raises(ExecutableFailedError) as info:
            await fail()
        err = info.value
        assert (err.exit_code, err.stdout, err.stderr) == (3, "out\n", "err\n")
        missing = flow.executable_task(lambda: ["asyncflow-no-such-command-xyz"])
        with pytest.raises(ExecutableFailedError) as info:
            await missing()
        assert info.value.exit_code == 127

    @scenario(C.EXECUTABLES)
    async def test_env_and_cwd(self, flow: WorkflowEngine, tmp_path: Path) -> None:
        show = flow.executable_task(
            env={"ASYNCFLOW_X": "forty two"}, cwd=str(tmp_path)
        )(lambda: 'echo "$ASYNCFLOW_X"; pwd')
        out = (await show()).splitlines()
        assert out[0] == "forty two"
        assert os.path.realpath(out[1]) == os.path.realpath(tmp_path)

    @scenario(C.EXECUTABLES)
    async def test_large_stdout_is_complete(self, flow: WorkflowEngine) -> None:
        lines = flow.executable_task(lambda: "seq 1 20000")
        out = await lines()
        assert out.splitlines() == [str(i) for i in range(1, 20001)]

    @scenario(C.EXECUTABLES)
    async def test_binary_output_is_bytes_never_replaced(
        self, flow: WorkflowEngine
    ) -> None:
        raw = flow.executable_task(text=False)(lambda: ["printf", "\\377\\000ok"])
        assert await raw() == b"\xff\x00ok"
        text = flow.executable_task(lambda: ["printf", "\\377"])
        with pytest.raises(OutputDecodeError) as info:
            await text()
        assert "text=False" in str(info.value)

    @scenario(C.EXECUTABLES)
    async def test_output_over_the_limit_stays_in_a_file(
        self, flow: WorkflowEngine
    ) -> None:
        numbers = "".join(f"{i}\n" for i in range(1, 20001))
        lines = flow.executable_task(output_limit=1000)(lambda: "seq 1 20000")
        out = await lines()
        assert isinstance(out, StdoutFile), out
        assert (out.size, out.read_text()) == (len(numbers), numbers)
        fail = flow.executable_task(output_limit=100)(
            lambda: "seq 1 20000; seq 1 20000 >&2; exit 4"
        )
        with pytest.raises(ExecutableFailedError) as info:
            await fail()
        err = info.value
        assert err.exit_code == 4 and err.stderr.endswith("19999\n20000\n")
        note, kept = err.stdout.split("\n", 1)
        assert "earlier bytes are in" in note and len(kept) == 100

    @scenario(C.EXECUTABLES)
    async def test_stdout_and_stderr_paths(
        self, flow: WorkflowEngine, tmp_path: Path
    ) -> None:
        out, err = tmp_path / "o.txt", tmp_path / "e.txt"
        both = flow.executable_task(stdout=out, stderr=str(err))(
            lambda: "echo to-out; echo to-err >&2"
        )
        got = await both()
        assert isinstance(got, StdoutFile) and os.fspath(got) == str(out)
        assert (out.read_text(), err.read_text()) == ("to-out\n", "to-err\n")


class TimeoutTests:
    @scenario(C.FUNCTIONS)
    async def test_timeout_raises_task_timeout_error(
        self, flow: WorkflowEngine
    ) -> None:
        async with Gate() as gate:
            slow = flow.function_task(timeout=0.5)(t.gate_wait)
            inc = flow.function_task(t.inc)
            fut = slow(gate.address, "slow")
            dependent = inc(fut)
            with pytest.raises(TaskTimeoutError) as info:
                await fut
            assert isinstance(info.value, TimeoutError)
            assert "slow" in str(info.value) or "gate_wait" in str(info.value)
            with pytest.raises(Exception) as dep:
                await dependent
            assert isinstance(dep.value.__cause__, TaskTimeoutError)

    @scenario(C.EXECUTABLES, C.KILL_EXECUTABLES)
    async def test_timeout_kills_executable(self, flow: WorkflowEngine) -> None:
        async with Gate() as gate:
            cmd = flow.executable_task(timeout=3.0)(lambda: gate.command("t"))
            fut = cmd()
            arrived = asyncio.ensure_future(gate.arrived("t"))
            await asyncio.wait([arrived, fut], return_when=asyncio.FIRST_COMPLETED)
            with pytest.raises(TaskTimeoutError):
                await fut
            if arrived.done():  # else it was killed before it could even report
                (pid,) = arrived.result()
                assert await _dies(pid)
            arrived.cancel()


class RetryTests:
    @scenario(C.FUNCTIONS)
    async def test_retries_rerun_failed_attempts(
        self, flow: WorkflowEngine, tmp_path: Path
    ) -> None:
        ok = flow.function_task(retries=2)(t.flaky)
        assert await ok(str(tmp_path / "a"), 2) == 3
        short = flow.function_task(retries=1)(t.flaky)
        with pytest.raises(RuntimeError, match="planned failure 2"):
            await short(str(tmp_path / "b"), 5)
        assert t.count_lines(str(tmp_path / "b")) == 2

    @scenario(C.FUNCTIONS)
    async def test_dependency_failure_is_not_retried(
        self, flow: WorkflowEngine, tmp_path: Path
    ) -> None:
        boom = flow.function_task(t.boom)
        child = flow.function_task(retries=3)(t.flaky)
        marker = str(tmp_path / "child")
        with pytest.raises(Exception) as info:
            await child(marker, boom())
        assert isinstance(info.value.__cause__, ValueError)
        assert t.count_lines(marker) == 0, "the dependent never ran"


class ParallelTests:
    @scenario(C.FUNCTIONS, C.PARALLEL)
    async def test_two_functions_run_at_once(self, flow: WorkflowEngine) -> None:
        async with Gate() as gate:
            gate.barrier("pair", 2)
            wait = flow.function_task(t.gate_wait)
            assert await asyncio.gather(
                wait(gate.address, "pair", 30), wait(gate.address, "pair", 30)
            ) == ["go", "go"]

    @scenario(C.EXECUTABLES, C.PARALLEL)
    async def test_two_executables_run_at_once(self, flow: WorkflowEngine) -> None:
        async with Gate() as gate:
            gate.barrier("pair", 2)
            cmd = flow.executable_task(lambda: gate.command("pair"))
            assert await asyncio.gather(cmd(), cmd()) == ["go\n", "go\n"]


class PayloadTests:
    @scenario(C.FUNCTIONS, C.LARGE_PAYLOADS)
    async def test_50mb_argument_and_result(self, flow: WorkflowEngine) -> None:
        size = 50 * 1024 * 1024
        make, nbytes = flow.function_task(t.make_bytes), flow.function_task(t.nbytes)
        assert await nbytes(make(size)) == size
        assert await nbytes(b"y" * size) == size
        assert len(await make(size)) == size


class SerializationTests:
    @scenario(C.FUNCTIONS, C.SERIALIZES)
    async def test_unserialisable_function_fails_clearly(
        self, flow: WorkflowEngine
    ) -> None:
        lock = threading.Lock()

        def holds_a_lock() -> bool:
            return lock.locked()

        task = flow.function_task(holds_a_lock)
        for _ in range(2):  # a failed attempt must not change the next one's error
            with pytest.raises(SerializationError, match="holds_a_lock"):
                await task()


class ResourceTests:
    @scenario(C.FUNCTIONS, C.RESOURCES)
    async def test_infeasible_request_fails_fast(self, flow: WorkflowEngine) -> None:
        greedy = flow.function_task(resources={"cores": 100_000})(t.inc)
        with pytest.raises(ResourceUnavailableError, match="inc"):
            await asyncio.wait_for(greedy(1), 60)
        gpus = flow.function_task(resources={"gpus": 4096})(t.inc)
        with pytest.raises(ResourceUnavailableError):
            await asyncio.wait_for(gpus(1), 60)
        assert await flow.function_task(resources={"cores": 1})(t.inc)(1) == 2
