"""The adapter toolkit's promises, on their own (the conformance suite checks
them again through every adapter that uses it)."""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
import subprocess
import threading

import pytest

from asyncflow.adapters.toolkit import (
    BatchedFetch,
    Failed,
    FunctionCache,
    Lifecycle,
    Scratch,
    is_pickling_error,
    lost_error,
    pack,
    portable,
)
from asyncflow.commands import COMMAND_PIDS_ENV
from asyncflow.errors import (
    BackendStartError,
    EngineClosedError,
    SerializationError,
    WorkerLostError,
)
from asyncflow.spec import TaskSpec

pytestmark = pytest.mark.timeout(30)
log = logging.getLogger("test.toolkit")


def _spec(fn, *args):
    return TaskSpec(uid="t.1", name="t", function=fn, args=args)


async def test_lifecycle_guards_and_background():
    life = Lifecycle("ToyBackend", log)
    life.begin_start()
    with pytest.raises(BackendStartError, match="ToyBackend is already started"):
        life.begin_start()
    never = asyncio.Event()
    task = life.spawn(never.wait())
    assert life.begin_shutdown() is True
    assert life.begin_shutdown() is False
    await life.cancel_background()
    assert task.cancelled() and not life.background
    with pytest.raises(EngineClosedError, match="was shut down"):
        life.begin_start()


async def test_lifecycle_logs_a_failed_background_job(caplog):
    life = Lifecycle("ToyBackend", log)
    life.begin_start()

    async def boom():
        raise ValueError("nobody awaits me")

    task = life.spawn(boom())
    await asyncio.gather(task, return_exceptions=True)
    await asyncio.sleep(0)
    assert "background job failed" in caplog.text


def test_function_cache_pickles_once_and_names_the_task():
    cache = FunctionCache("Toy")
    spec = _spec(len)
    assert cache.blob(spec) is cache.blob(spec)
    lock = threading.Lock()
    with pytest.raises(SerializationError, match="task 't'.*for Toy"):
        cache.blob(_spec(lambda: lock))


def test_pack_prefers_the_c_pickler_and_names_a_bad_argument():
    spec = _spec(len, 1)
    assert pickle.loads(pack((1, "a"), spec, "Toy")) == (1, "a")
    with pytest.raises(SerializationError, match="an argument.*for Toy"):
        pack((threading.Lock(),), spec, "Toy")


def test_portable_strips_tracebacks_and_replaces_what_cannot_travel():
    try:
        raise KeyError("k")
    except KeyError as exc:
        caught = exc
    assert portable(caught, "t") is caught and caught.__traceback__ is None

    class Holds(Exception):
        def __init__(self):
            super().__init__("holds a lock")
            self.lock = threading.Lock()

    err = portable(Holds(), "t")
    assert isinstance(err, SerializationError) and "Holds" in str(err)


def test_error_classifiers():
    assert is_pickling_error(pickle.PicklingError("x"))
    assert is_pickling_error(TypeError("cannot pickle '_thread.lock' object"))
    assert not is_pickling_error(TypeError("unsupported operand"))
    err = lost_error("t", "the job reached its walltime of 1:00")
    assert isinstance(err, WorkerLostError) and "longer 'walltime'" in str(err)


async def test_batched_fetch_batches_a_loop_turn_and_fails_on_close():
    calls: list[list[int]] = []
    gate = asyncio.Event()

    async def get_many(refs):
        calls.append(list(refs))
        await gate.wait()
        return [Failed(KeyError(r)) if r == 3 else r * 10 for r in refs]

    fetch = BatchedFetch(get_many, lambda exc, ref: exc, log, limit=1)
    first = [fetch.fetch(i) for i in range(4)]
    await asyncio.sleep(0)
    later = fetch.fetch(9)  # waits behind the single batch in flight
    gate.set()
    assert await asyncio.gather(*first[:3]) == [0, 10, 20]
    with pytest.raises(KeyError):
        await first[3]
    assert await later == 90
    assert calls == [[0, 1, 2, 3], [9]]
    gate.clear()
    stuck = fetch.fetch(5)
    await asyncio.sleep(0)
    await fetch.close(EngineClosedError("closed"))
    with pytest.raises(EngineClosedError):
        await stuck
    with pytest.raises(EngineClosedError):
        fetch.fetch(6)


def test_scratch_kills_listed_commands_and_removes_itself():
    scratch = Scratch()
    path = scratch.make("asyncflow-test-")
    env = scratch.command_env()
    proc = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        open(os.path.join(env[COMMAND_PIDS_ENV], str(proc.pid)), "w").close()
        assert scratch.close() == 1
        assert proc.wait(timeout=10) == -9
    finally:
        proc.kill()
        proc.wait()
    assert not os.path.exists(path) and scratch.close() == 0


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="found by environment on Linux")
def test_scratch_kills_a_command_its_worker_had_no_time_to_list():
    scratch = Scratch()
    scratch.make("asyncflow-test-")
    env = {**os.environ, **scratch.command_env()}
    proc = subprocess.Popen(["sleep", "60"], start_new_session=True, env=env)
    bystander = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        assert scratch.close() == 1
        assert proc.wait(timeout=10) == -9
        assert bystander.poll() is None
    finally:
        for p in (proc, bystander):
            p.kill()
            p.wait()


class _Recorder:
    def set_result(self, uid, value):
        pass

    def set_exception(self, uid, exc):
        pass


def _queue_sizes(chunk: bool) -> list[int]:
    from concurrent.futures import Future

    from asyncflow.adapters.toolkit.chunks import ChunkQueue

    sent: list[int] = []

    def send(calls):
        sent.append(len(calls))
        return Future()  # never finishes: only the first chunks are sent

    queue = ChunkQueue(send, lambda exc: None, 4, _Recorder(), lambda s: b"f", "test")
    queue._times[b"f"] = 1e-5  # measured short
    specs = [
        TaskSpec(uid=f"t.{i}", name="t", function=len, args=("x",), chunk=chunk)
        for i in range(200)
    ]
    queue.put(specs)
    return sent


def test_chunk_false_travels_alone() -> None:
    assert max(_queue_sizes(True)) > 1, "short calls share chunks"
    assert set(_queue_sizes(False)) == {1}, "chunk=False: one task per call"


def test_a_function_that_returned_a_large_value_keeps_the_runtime_path() -> None:
    from concurrent.futures import Future

    from asyncflow.adapters.toolkit.chunks import ChunkQueue
    from asyncflow.adapters.toolkit.routing import route

    sent: list[Future] = []

    def send(calls):
        sent.append(Future())
        return sent[-1]

    queue = ChunkQueue(send, lambda exc: None, 1, _Recorder(), lambda s: b"f", "test")
    specs = [
        TaskSpec(uid=f"t.{i}", name="t", function=len, args=("x",)) for i in range(20)
    ]
    rest, _ = route(queue, specs, 16, lambda s: True)
    assert rest == [] and sent  # a burst of one function: chunked
    big = pickle.dumps(b"x" * (100 * 1024))
    sent[0].set_result(([(True, big, True)], [(0.0, 1e-4)], "w"))
    again = [
        TaskSpec(uid=f"u.{i}", name="t", function=len, args=("x",)) for i in range(20)
    ]
    rest, _ = route(queue, again, 16, lambda s: True)
    assert rest == again  # it returned a large value: the runtime's own path


def test_pipes_forget_a_chain_cancelled_behind_a_failed_upstream() -> None:
    from asyncflow.adapters._pipes import Pipes
    from asyncflow.protocol import UpstreamRef
    from asyncflow.spec import TaskSpec

    def spec(uid: str, *ups: str) -> TaskSpec:
        refs = tuple(UpstreamRef(None, u) for u in ups)  # type: ignore[arg-type]
        return TaskSpec(uid, uid, abs, args=refs, has_remote_args=True)

    pipes = Pipes(sink=None)  # type: ignore[arg-type]
    pipes.live.add("a")
    assert pipes.park(spec("b", "a")) and pipes.park(spec("c", "b"))
    assert pipes.finished("a", False, None) == []
    # the engine cancels what depended on the failure
    assert pipes.drop("b") and pipes.drop("c")
    assert len(pipes) == 0 and not pipes.live
