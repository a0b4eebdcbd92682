"""One DataFlowKernel's life: loading it, sharing it and cleaning up after it.

The backends built on one DFK (``per_executor``) share a :class:`Runtime`,
which loads the DFK on first use and, if it was loaded here, cleans it up when
the last of them shuts down; a DFK the caller passed in stays up.  The DFK is
built directly (not with ``parsl.load``), so a user's global DFK stays
untouched.  Cleaning up goes further than ``dfk.cleanup()``: the local worker
blocks' process groups are reaped, and a DFK whose HTEX interchange died gets a
time limit, because Parsl's own cleanup then blocks forever.  A runtime built
from the page's HPC dict also owns its Slurm side (``slurm.SlurmBlocks``):
started before the DFK loads, closed after Parsl's cleanup, so that no job is
left in the queue even if Parsl's own ``scancel`` failed.  :func:`runtime_for`
picks the runtime a ``ParslExecutionBackend(config)`` runs on.
"""

from __future__ import annotations

import contextlib
import os
import signal
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import parsl
from parsl.config import Config
from parsl.dataflow.dflow import DataFlowKernel
from parsl.executors import HighThroughputExecutor
from parsl.executors.base import ParslExecutor
from parsl.providers import LocalProvider

from ...commands import COMMAND_PIDS_ENV
from ...errors import BackendStartError, EngineClosedError, TaskDefinitionError
from ...hpc import is_allocation
from ..toolkit import Scratch
from .cancel import Control
from .config import fix_path, local_htex_config
from .executors import Profile
from .slurm import SlurmBlocks
from .state import log

_INTERNAL = "_parsl_internal"
#: How long cleaning up may wait for a DFK whose interchange died (Parsl's own
#: cleanup then blocks forever on its command channel).
_BROKEN_CLEANUP = 5.0


class Runtime:
    """One DataFlowKernel, shared by the backends built on it.

    ``owned``: the DFK was loaded here and is cleaned up when the last backend
    using it shuts down; otherwise it belongs to the caller and stays up.
    """

    def __init__(
        self,
        config: Config | None,
        dfk: DataFlowKernel | None,
        scratch: Scratch | None,
        wait_for_workers: float | None,
        batch: SlurmBlocks | None = None,
    ):
        self.fix_path = scratch is None  # the default config brings its own PATH
        self.config = config
        self.dfk = dfk
        self.owned = dfk is None
        self.scratch = scratch  # the default config's run dir and command list
        self.wait_for_workers = wait_for_workers
        self.users = 0
        self.closed = False
        self._lock = threading.Lock()
        self.control: Control | None = None
        self.batch = batch

    @property
    def executors(self) -> Sequence[ParslExecutor]:
        if self.dfk is not None:
            return [e for lbl, e in self.dfk.executors.items() if lbl != _INTERNAL]
        assert self.config is not None
        return list(self.config.executors)

    def acquire(self) -> None:
        """Load the DFK if needed (blocking; run from a thread)."""
        with self._lock:
            if self.closed:
                raise EngineClosedError("this Parsl DataFlowKernel was cleaned up")
            self.users += 1
            if self.dfk is None:
                try:
                    self._load()
                except BaseException:
                    self.users -= 1
                    self.closed = True  # a Config cannot be loaded twice
                    self.discard()
                    raise
            assert self.dfk is not None
            profiles = [Profile(e) for e in self.executors]
            if self.control is None and any(
                p.local and not p.in_process for p in profiles
            ):
                self.control = Control(os.path.join(self.dfk.run_dir, "asyncflow-ctl"))

    def _load(self) -> None:
        assert self.config is not None
        if self.fix_path:
            fix_path(self.config.executors)
        if self.batch is not None:
            self.batch.start()  # raises with Slurm's reason for an impossible job
        try:
            dfk = DataFlowKernel(self.config)
        except Exception as exc:
            raise BackendStartError(
                f"Parsl could not load its configuration ({type(exc).__name__}: "
                f"{exc}); "
                "a Config can be loaded only once, and HTEX needs "
                "process_worker_pool.py and interchange.py on PATH"
            ) from exc
        self.dfk = dfk
        if self.wait_for_workers:
            try:
                self._await_workers(self.wait_for_workers)
            except BaseException:
                self._cleanup()
                raise

    def _await_workers(self, timeout: float) -> None:
        assert self.dfk is not None
        deadline = time.monotonic() + timeout
        for ex in self.executors:
            if not isinstance(ex, HighThroughputExecutor):
                continue
            while True:
                if ex.bad_state_is_set:
                    raise BackendStartError(
                        f"Parsl executor {ex.label!r} failed to start its workers: "
                        f"{ex.executor_exception}; see {ex.logdir}"
                    )
                if sum(m["worker_count"] for m in ex.connected_managers()) > 0:
                    break
                if time.monotonic() > deadline:
                    raise BackendStartError(
                        f"no HTEX worker of executor {ex.label!r} connected within "
                        f"{timeout:g}s; check that process_worker_pool.py runs here "
                        f"(submit scripts and logs under {self.dfk.run_dir})"
                    )
                time.sleep(0.05)

    def release(self) -> None:
        with self._lock:
            self.users -= 1
            if self.users > 0 or self.closed:
                return
            if self.control is not None:
                self.control.close()
            if not self.owned:
                self.control = None  # a later backend on this DFK opens a new one
                return
            self.closed = True
            self._cleanup()

    def _cleanup(self) -> None:
        dfk = self.dfk
        if dfk is None:
            self.discard()
            return
        groups = _local_block_groups(dfk)
        broken = False
        try:
            if not dfk.cleanup_called:
                broken = _bounded_cleanup(dfk)
            if parsl.DataFlowKernelLoader._dfk is dfk:
                parsl.clear()
        finally:
            # Without an interchange the blocks' managers would wait out their
            # heartbeat threshold: stop them now.
            _reap(groups, grace=0.0 if broken else 5.0)
            self.discard()

    def discard(self) -> None:
        """Release what this runtime owns besides the DFK: its Slurm jobs
        (after Parsl's cleanup, which cancels them first), then its temp dir,
        killing the commands still listed there: the blocks are gone, so such
        a command lost its worker."""
        try:
            if self.batch is not None:
                self.batch.close()
        finally:
            if self.scratch is not None:
                self.scratch.close()


def runtime_for(
    config: Config | DataFlowKernel | Mapping[str, Any] | None,
    max_workers: int,
    wait_for_workers: float | None,
) -> Runtime:
    """The runtime a ``ParslExecutionBackend(config)`` runs on: the default local
    HTEX, a loaded DFK, a Config, or the page's HPC dict translated by ``slurm``."""
    if config is None:
        return _default_runtime(max_workers, wait_for_workers)
    if isinstance(config, DataFlowKernel):
        if config.cleanup_called:
            raise TaskDefinitionError("this Parsl DataFlowKernel was cleaned up")
        return Runtime(None, config, None, None)
    if isinstance(config, Config):
        return Runtime(config, None, None, wait_for_workers)
    if is_allocation(config):
        assert isinstance(config, Mapping)
        batch = SlurmBlocks(config)
        return Runtime(batch.config, None, None, wait_for_workers, batch=batch)
    raise TaskDefinitionError(
        "ParslExecutionBackend takes the page's HPC dict ({'resource': "
        "'slurm', ...}), a parsl.config.Config, a loaded DataFlowKernel or "
        f"nothing, got {type(config).__name__}"
    )


def _default_runtime(max_workers: int, wait_for_workers: float | None) -> Runtime:
    """A local HTEX whose run dir, worker temp dir and command list live in one
    scratch dir that the runtime removes."""
    scratch = Scratch()
    # The workers' TMPDIR holds unix sockets, whose paths must stay under 108
    # bytes: under a deep TMPDIR the scratch dir goes to /tmp instead.
    deep = len(tempfile.gettempdir()) > 30
    tmpdir = scratch.make("asyncflow-parsl-", "/tmp" if deep else None)
    worker_tmp = os.path.join(tmpdir, "tmp")
    os.makedirs(worker_tmp)  # before the interchange, which starts first
    try:
        cfg = local_htex_config(
            os.path.join(tmpdir, "runinfo"),
            max_workers=max_workers,
            # unix socket paths below it must stay under 108 bytes
            worker_tmpdir=worker_tmp if len(worker_tmp) <= 60 else None,
            command_pids=scratch.command_env()[COMMAND_PIDS_ENV],
        )
    except BaseException:
        scratch.close()
        raise
    return Runtime(
        cfg, None, scratch, 60.0 if wait_for_workers is None else wait_for_workers
    )


def dead_interchanges(
    dfk: DataFlowKernel,
) -> list[tuple[HighThroughputExecutor, int]]:
    """The HTEX executors of ``dfk`` whose interchange process has exited, with
    its exit code (the interchange is always a child of this process)."""
    dead = []
    for ex in dfk.executors.values():
        if not isinstance(ex, HighThroughputExecutor):
            continue
        proc = getattr(ex, "interchange_proc", None)
        poll = getattr(proc, "poll", None)
        if poll is None:
            continue
        with contextlib.suppress(Exception):
            code = poll()
            if code is not None:
                dead.append((ex, code))
    return dead


def _bounded_cleanup(dfk: DataFlowKernel) -> bool:
    """``dfk.cleanup()``, given up on ``_BROKEN_CLEANUP`` seconds after an
    interchange is seen dead; True if it was given up on.

    With its interchange gone, Parsl's job status poller blocks forever on the
    command channel, and ``cleanup()`` joins it.  The interchange may die while
    cleanup runs, not only before: Ctrl-C in a terminal reaches the driver's
    whole process group, the interchange included, and the driver's shutdown
    starts before the interchange has finished dying.  So the wait watches for
    it throughout.  The abandoned threads are daemons blocked on sockets; the
    worker blocks are reaped (and Slurm jobs cancelled) by the caller.
    """
    thread = threading.Thread(
        target=dfk.cleanup, name="asyncflow-parsl-cleanup", daemon=True
    )
    thread.start()
    while thread.is_alive() and not dead_interchanges(dfk):
        thread.join(0.1)
    if not thread.is_alive():
        return False
    thread.join(_BROKEN_CLEANUP)
    if not thread.is_alive():
        return False
    log.warning(
        "Parsl's cleanup did not finish within %.0f s because an HTEX "
        "interchange died; its threads are abandoned",
        _BROKEN_CLEANUP,
    )
    return True


def _local_block_groups(dfk: DataFlowKernel) -> list[int]:
    groups = []
    for ex in dfk.executors.values():
        provider = getattr(ex, "provider", None)
        if not isinstance(provider, LocalProvider):
            continue
        for job in provider.resources.values():
            with contextlib.suppress(OSError, KeyError, TypeError):
                groups.append(os.getpgid(job["remote_pid"]))
    return [g for g in groups if g != os.getpgrp()]


def _reap(groups: list[int], grace: float = 5.0) -> None:
    """Wait for the worker blocks' process groups to empty; SIGKILL leftovers."""
    deadline = time.monotonic() + grace
    for pgid in groups:
        while True:
            try:
                os.killpg(pgid, 0)
            except (ProcessLookupError, PermissionError):
                break
            if time.monotonic() > deadline:
                with contextlib.suppress(OSError):
                    os.killpg(pgid, signal.SIGKILL)
                break
            time.sleep(0.05)
