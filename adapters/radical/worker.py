"""Function tasks in raptor: the envelope both ways, and the worker class.

Raptor alone is not enough for asyncflow's promises.  It reports a raised
exception only as its ``repr`` (the type and traceback are lost), and it calls
task functions inside a running event loop, where an ``async def`` task could
not be run with ``asyncio.run``.  So every function task is sent as a call to
:func:`call_remote`, which runs the task in a thread of its own and returns a
cloudpickled ``(ok, value)`` envelope that :func:`unpack_result` opens in the
driver.

Nor does raptor notice a task whose process dies (SIGKILL, the OOM killer, a
crash in C code): it forks a process per task and only ever reads results that
process sends, so the task would never end and its slot would stay taken.
:class:`AsyncflowWorker` reports such a task as lost (:data:`LOST`).
"""

from __future__ import annotations

import asyncio
import base64
import importlib
import multiprocessing as mp
import multiprocessing.connection as mp_connection
import os
import signal
import sys
import threading
from collections.abc import Sequence
from typing import Any

import cloudpickle

from ...errors import SerializationError
from ...spec import TaskSpec
from ...worker import WORKER_ENV, call_function
from ._rp import rp, ru

__all__ = ["LOST", "AsyncflowWorker", "call_remote", "pack_call", "unpack_result"]

#: the ``exception`` of a function task whose process died before it reported;
#: its ``exception_detail`` says how it died
LOST = "WorkerLostError"


def pack_call(spec: TaskSpec) -> bytes:
    """Pickle the call in the driver, so that an unpicklable task fails at once."""
    try:
        return cloudpickle.dumps((spec.function, spec.args, spec.kwargs, spec.is_async))
    except Exception as exc:
        raise SerializationError(
            f"task {spec.name!r}: its function or arguments cannot be serialised "
            f"for a raptor worker ({type(exc).__name__}: {exc}); define the function "
            "at module level and do not capture locks, sockets or open files"
        ) from exc


def call_remote(
    paths: Sequence[str], name: str, payload: bytes, ticket: str = ""
) -> str:
    """Runs inside a raptor worker: call the task, return a pickled envelope.

    A task whose ``ticket`` file exists was cancelled while raptor held it in
    its queue, and is not called at all."""
    if ticket and os.path.exists(ticket):
        return _envelope((False, asyncio.CancelledError(f"task {name!r}")), name)
    for p in paths:  # the driver's modules, for functions pickled by reference
        if p not in sys.path:
            sys.path.append(p)
    box: list[tuple[bool, Any]] = []

    def run() -> None:
        try:
            fn, args, kwargs, is_async = cloudpickle.loads(payload)
        except BaseException as exc:
            box.append((False, _unpicklable(name, exc)))
            return
        try:
            box.append((True, call_function(fn, args, kwargs, is_async, name)))
        except BaseException as exc:
            box.append((False, exc))

    th = threading.Thread(target=run, name="asyncflow-task")
    th.start()
    th.join()
    return _envelope(box[0], name)


def _envelope(outcome: tuple[bool, Any], name: str = "") -> str:
    try:
        blob = cloudpickle.dumps(outcome)
    except Exception as exc:
        what = "result" if outcome[0] else f"exception {outcome[1]!r}"
        blob = cloudpickle.dumps(
            (
                False,
                SerializationError(
                    f"task {name!r}: its {what} cannot be pickled "
                    f"({type(exc).__name__}: {exc}); return plain data"
                ),
            )
        )
    # base64: raptor moves the return value through JSON-based messages
    return base64.b64encode(blob).decode("ascii")


def _unpicklable(name: str, exc: BaseException) -> SerializationError:
    return SerializationError(
        f"task {name!r}: it cannot be unpickled in the raptor worker "
        f"({type(exc).__name__}: {exc}); the worker must be able to import "
        "every module the function refers to"
    )


def unpack_result(name: str, envelope: Any) -> tuple[bool, Any]:
    """The ``(ok, value)`` that :func:`call_remote` returned, in the driver."""
    try:
        ok, value = cloudpickle.loads(base64.b64decode(envelope))
    except Exception as exc:
        return False, SerializationError(
            f"task {name!r}: its result cannot be unpickled in the driver "
            f"({type(exc).__name__}: {exc})"
        )
    return bool(ok), value


class AsyncflowWorker(rp.raptor.DefaultWorker):
    """radical.pilot's DefaultWorker, minus the imports in every task.

    DefaultWorker forks a fresh process per task, so a function pickled by
    reference would import its module (and whatever that imports) every time:
    for the conformance tasks that meant importing pytest per task, about one
    task a second.  This worker imports asyncflow once, by being defined here,
    and each task's module once, in the long-lived worker process, before
    forking.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # setproctitle finds the memory a title goes to by walking back from the
        # first environment string, which the process forked per task replaces
        # (``_dispatch``); found here first, the task's process can be titled
        import setproctitle

        setproctitle.getproctitle()
        super().__init__(*args, **kwargs)

    def _request_cb(self, tasks: Any) -> Any:
        for task in ru.as_list(tasks):
            meta = (task.get("description") or {}).get("metadata") or {}
            _extend_path(meta.get("asyncflow_path") or ())
            _import_once(meta.get("asyncflow_modules") or ())
        return super()._request_cb(tasks)

    # The two methods below replace DefaultWorker's (radical.pilot 1.103), which
    # wait for the task's process and report nothing if it dies before reporting.
    def _dispatch(self, task: dict[str, Any], env: dict[str, str]) -> None:
        """Runs in a process forked per task: run the task in a child of its own
        and report it, including a child that ended without reporting.

        Only this process writes to raptor's result queue.  The queue's writers
        share one lock, so a task's process killed while writing to it would
        hang every later task of the worker; the task's process hands its result
        here over a pipe of its own instead."""
        task["pid"] = os.getpid()
        # chunks' traces name this worker, not the process forked per task
        os.environ[WORKER_ENV] = f"pid {os.getppid()}"
        os.environ.update(env)
        os.environ.update(task.get("environment") or {})
        recv, send = mp.Pipe(duplex=False)
        proc = mp.Process(target=self._run_task, args=(task, send), daemon=True)
        proc.start()
        send.close()
        timeout = task["description"].get("timeout") or None
        # its exit too, not only the pipe: a process the task started may still
        # hold the pipe's write end
        ready = mp_connection.wait([recv, proc.sentinel], timeout)
        result = _received(recv) if ready else None
        if result is None:
            result = self._lost(task, proc, None if ready else timeout)
        self._result_queue.put(result)
        self._result_queue.close()
        self._result_queue.join_thread()
        sys.exit(1)

    @staticmethod
    def _lost(task: dict[str, Any], proc: Any, timed_out: float | None) -> list[Any]:
        """The result of a task whose process ended unreported, or ran past its
        timeout (``timed_out``)."""
        if timed_out is not None:
            proc.terminate()
            proc.join()
            err = f"timeout (>{timed_out})"
            return [task, None, err, 1, None, ['TimeoutError("task timed out")', None]]
        proc.join(10)  # closing the pipe, it was on its way out
        if proc.is_alive():
            proc.kill()
            proc.join()
        code = proc.exitcode or 1
        how = f"exited with code {code}"
        if code < 0:
            how = f"was killed by signal {-code} ({_signame(-code)})"
        who = f"the process running it (pid {proc.pid})"
        err = f"{who} {how} before it reported a result"
        return [task, None, err, code, None, [LOST, err]]

    def _run_task(self, task: dict[str, Any], send: Any) -> None:
        import setproctitle

        setproctitle.setproctitle(f"rp.dispatch.{task['uid']}")
        gpus = task["slots"][0]["gpus"]
        if gpus:
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in gpus)
        out = err = val = None
        ret = 1
        exc: Any = [None, None]
        try:
            sbox = task["task_sandbox_path"]
            ru.rec_makedir(sbox)
            os.chdir(sbox)
            mode = task["description"]["mode"]
            dispatcher = self.get_dispatcher(mode)
            if mode in (rp.TASK_FUNCTION, rp.TASK_METHOD):
                out, err, ret, val, exc = asyncio.run(dispatcher(task))
            else:
                out, err, ret, val, exc = dispatcher(task)
        except Exception as e:
            exc = [repr(e), "\n".join(ru.get_exception_trace())]
        finally:
            os.chdir(self._sbox)
        send.send([task, out, err, ret, val, exc])
        send.close()


def _extend_path(paths: Sequence[str]) -> None:
    """The driver's import path, so that the task's module is found here."""
    for p in paths:
        if p not in sys.path:
            sys.path.append(p)


def _import_once(names: Sequence[str]) -> None:
    """Import each module in this long-lived process, where every forked task
    inherits it; a module that failed is not tried again for each task."""
    for name in names:
        if name not in sys.modules and name not in _FAILED_IMPORTS:
            try:
                importlib.import_module(name)
            except BaseException:  # the task itself will report it
                _FAILED_IMPORTS.add(name)


def _received(recv: Any) -> list[Any] | None:
    """What the task's process sent, or None if it ended without sending it."""
    try:
        if recv.poll(0):
            return recv.recv()
    except (EOFError, OSError):
        pass
    finally:
        recv.close()
    return None


def _signame(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:
        return "unknown signal"


_FAILED_IMPORTS: set[str] = set()
