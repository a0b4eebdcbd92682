"""The result store (issue: durable runs), on the thread and process pools.

What a store promises: a stored task resolves without running, keys change
with the code and the inputs (and a dependent's with its upstream's), failures
are never stored, and damage is detected and recomputed.  A driver SIGKILLed
halfway, on every backend: ``tests/reliability/test_store_resume.py``.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from asyncflow import InputFile, OutputFile, WorkflowEngine
from asyncflow.store import MISS, ResultStore

pytestmark = pytest.mark.timeout(120)


def body(source: str) -> Callable[..., Any]:
    """A function named ``step`` from ``source``: one name, new bodies."""
    space: dict[str, Any] = {}
    exec(textwrap.dedent(source), space)
    fn: Callable[..., Any] = space["step"]
    return fn


def test_values_round_trip_inline_and_in_files(tmp_path: Path) -> None:
    store = ResultStore(tmp_path)
    big = b"x" * (300 * 1024)
    assert store.put("a", "small", {"v": 1}) and store.put("b", "big", big)
    assert store.get("a") == {"v": 1} and store.get("b") == big
    assert store.get("nope") is MISS
    assert len(store) == 2 and (tmp_path / "values" / "b").exists()
    assert [r.task for r in store] == ["small", "big"]
    assert store.size() > len(big)


def test_damage_is_detected_and_recomputed(tmp_path: Path) -> None:
    store = ResultStore(tmp_path)
    store.put("b", "big", b"y" * (300 * 1024))
    (tmp_path / "values" / "b").write_bytes(b"truncated")
    with pytest.warns(RuntimeWarning, match="'big' is damaged"):
        assert store.get("b") is MISS
    assert len(store) == 0


def test_unpicklable_values_are_reported_once_and_not_stored(tmp_path: Path) -> None:
    import threading

    store = ResultStore(tmp_path)
    with pytest.warns(RuntimeWarning, match="'locky'.*cannot be pickled"):
        assert not store.put("k", "locky", threading.Lock())
    assert not store.put("k2", "locky", threading.Lock())  # no second warning
    assert len(store) == 0


def test_prune_by_task_and_age_and_orphans(tmp_path: Path) -> None:
    store = ResultStore(tmp_path)
    store.put("a", "keep", 1)
    store.put("b", "drop", 2)
    (tmp_path / "values" / "orphan").write_bytes(b"left by a crash")
    assert store.prune(task="drop") == 1
    assert [r.task for r in store] == ["keep"]
    assert not (tmp_path / "values" / "orphan").exists()
    assert store.prune(older_than=0) == 1 and len(store) == 0


async def run(store: Path, fn: Callable[..., Any], other: Callable[..., Any]) -> Any:
    async with WorkflowEngine(store=store) as flow:
        first, then = flow.function_task(fn), flow.function_task(other)
        values = await asyncio.gather(then(first(1)), then(5))
        return values, flow.summary()


async def test_a_stored_task_runs_once_and_a_changed_body_only_its_dependents(
    tmp_path: Path,
) -> None:
    plus_one = body("def step(x):\n    return x + 1\n")
    plus_two = body("def step(x):\n    return x + 2\n")
    double = body("def step(x):\n    return 2 * x\n")
    values, summary = await run(tmp_path, plus_one, double)
    assert values == [4, 10] and summary["stored"] == 3 and summary["cached"] == 0
    values, summary = await run(tmp_path, plus_one, double)
    assert values == [4, 10] and summary["cached"] == 3 and summary["stored"] == 0
    values, summary = await run(tmp_path, plus_two, double)
    # the changed task and its dependent run; double(5) does not
    assert values == [6, 10] and summary["cached"] == 1 and summary["stored"] == 2


async def test_failures_are_never_stored_and_cache_false_always_runs(
    tmp_path: Path,
) -> None:
    ran: list[int] = []

    def flaky(x: int) -> int:
        ran.append(x)
        if len(ran) == 1:
            raise ValueError("first time")
        return x

    for expect_error in (True, False, False):
        async with WorkflowEngine(store=tmp_path) as flow:
            task = flow.function_task(flaky)
            if expect_error:
                with pytest.raises(ValueError):
                    await task(7)
            else:
                assert await task(7) == 7
    assert ran == [7, 7]  # failed, then ran and stored, then from the store
    async with WorkflowEngine(store=tmp_path) as flow:
        never = flow.function_task(cache=False)(flaky)
        assert await never(7) == 7 and ran == [7, 7, 7]


async def test_executables_key_on_inputs_and_check_their_outputs(
    tmp_path: Path,
) -> None:
    src, dst = tmp_path / "in.txt", tmp_path / "out.txt"
    src.write_text("one\n")

    async def copy() -> tuple[str, dict[str, Any]]:
        async with WorkflowEngine(store=tmp_path / "store") as flow:
            cp = flow.executable_task(lambda a, b: f"cat {a} > {b}; cat {a}")
            out = await cp(InputFile(src), OutputFile(dst))
            return out, flow.summary()

    assert (await copy())[1]["stored"] == 1
    assert (await copy())[1]["cached"] == 1
    dst.unlink()  # a declared output gone: not a hit
    out, summary = await copy()
    assert summary["cached"] == 0 and dst.read_text() == "one\n"
    src.write_text("two\n")  # new input content: a new key
    out, summary = await copy()
    assert out == "two\n" and summary["cached"] == 0


def test_cli_store_refresh_ls_and_prune(tmp_path: Path) -> None:
    script = tmp_path / "wf.py"
    script.write_text(
        textwrap.dedent(
            """
            import asyncio
            from asyncflow import WorkflowEngine

            def square(x):
                return x * x

            async def main():
                async with WorkflowEngine() as flow:
                    task = flow.function_task(square)
                    total = sum(await asyncio.gather(*(task(i) for i in range(20))))
                    print(total, flow.summary()["cached"])

            asyncio.run(main())
            """
        )
    )
    store = tmp_path / "store"

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "asyncflow", *args],
            capture_output=True,
            text=True,
            timeout=60,
        )

    assert cli("run", "--store", str(store), str(script)).stdout.split() == [
        "2470",
        "0",
    ]
    assert cli("run", "--store", str(store), str(script)).stdout.split() == [
        "2470",
        "20",
    ]
    again = cli("run", "--store", str(store), "--refresh", str(script))
    assert again.stdout.split() == ["2470", "0"]
    listing = cli("store", "ls", str(store)).stdout
    assert "square" in listing and "20 results" in listing
    assert "pruned 20" in cli("store", "prune", str(store), "--task", "square").stdout
    assert cli("store", "ls", str(tmp_path / "none")).returncode == 2
