"""Owning a dask-jobqueue SLURMCluster built from the page's HPC dict.

The translation of the dict is in ``slurm``; this is the lifecycle around it,
which no hand-written SLURMCluster has: Slurm is asked before anything is queued
(an impossible request fails at once, with Slurm's reason), the jobs are watched
by :class:`asyncflow.slurm.BatchJobs` (queue states reported to the engine), a
job that ends under the backend fails the tasks it takes away, naming Slurm's
reason (and, once no job is left, every task, instead of leaving them queued in
Dask for ever), and shutdown returns only once Slurm lists none of the jobs.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import subprocess
import time
from collections.abc import Callable, Sequence
from typing import Any

import dask

from ...errors import BackendStartError, TaskDefinitionError
from ...slurm import BatchJobs, driver_address, preflight
from ..toolkit import Scratch, lost_error
from .slurm import WHO, Shape, SlurmPlan, cluster_options, merge, node_shape
from .state import DaskState, log
from .worker import CommandReaper

#: seconds a task whose worker died waits for Slurm to say why (BatchJobs polls
#: every 2 s; a job stays COMPLETING for KillWait after its walltime)
LOST_GRACE = 20.0
_JOB_ID = re.compile(r"Slurm job (\S+)")


def _log_dir(state: DaskState) -> str:
    """A temp dir for the job logs under the current directory, which the nodes
    share with the login node on a cluster (``/tmp`` is not), as ``sbatch``'s own
    ``slurm-<id>.out`` is; ``/tmp`` if the current directory is read-only."""
    try:
        return state.scratch.make(".asyncflow-dask-", os.getcwd())
    except OSError:
        return state.scratch.make("asyncflow-dask-")


def _submit_error(exc: Exception, shape: Shape, plan: SlurmPlan) -> BackendStartError:
    """sbatch refused a job that the preflight let through (``--mem`` is not
    part of it): Slurm's own words, instead of dask-jobqueue's command dump."""
    said = [
        line.strip().removeprefix("sbatch: error: ")
        for line in str(exc).splitlines()
        if line.strip().startswith("sbatch: error: ")
    ]
    job = (
        f"{shape.cores} cores, {shape.memory} MB, {plan.alloc.walltime_hms} on "
        f"partition {plan.alloc.queue or '(default)'}"
    )
    if said:
        return BackendStartError(
            f"{WHO}: Slurm refused the workers' job ({job}): {' '.join(said)}; "
            "check 'cores_per_node' and 'memory_per_node' against "
            "`sinfo -o '%P %c %m'`"
        )
    return BackendStartError(
        f"{WHO}: could not start Dask workers through Slurm ({job}): "
        f"{type(exc).__name__}: {exc}"
    )


class SlurmAllocation:
    """Owning a SLURMCluster: start it, watch its jobs, fail tasks they take away.

    ``cancel`` is the backend's own: a job that ends under it cancels the tasks
    it takes away as the engine would."""

    def __init__(
        self, state: DaskState, plan: SlurmPlan, cancel: Callable[[Sequence[str]], None]
    ):
        self._state = state
        self._plan = plan
        self._cancel = cancel
        self._jobs: BatchJobs | None = None
        self._job_ended: asyncio.Event | None = None
        self._jobs_gone: set[str] = set()
        self._last_lost: tuple[str, float] | None = None  # why, and when
        #: what the workers' TMPDIR is named after on each node (see node_tmpdir)
        self._node_tmp = Scratch()

    async def start(self) -> None:
        plan, state = self._plan, self._state
        self._job_ended = asyncio.Event()
        try:
            shape, host = await asyncio.to_thread(self._prepare, plan)
        except (BackendStartError, TaskDefinitionError):
            raise
        except (OSError, subprocess.SubprocessError) as exc:
            raise BackendStartError(f"{WHO}: cannot ask Slurm: {exc}") from exc
        state.planned = shape.workers(plan.alloc.nodes)
        state.refresh_info()
        jobs = self._jobs
        assert jobs is not None
        dirs = _log_dir(state), self._node_tmp.make("asyncflow-dask-")
        opts = merge(
            cluster_options(plan, shape, host, f"{jobs.prefix}-dask", dirs),
            state.settings.cluster_options,
        )
        try:
            await self._submit_jobs(opts, plan.alloc.nodes)
        except (BackendStartError, TaskDefinitionError):
            raise
        except Exception as exc:
            raise _submit_error(exc, shape, plan) from exc

    def _prepare(self, plan: SlurmPlan) -> tuple[Shape, str]:
        """Blocking (run in a thread): ask Slurm before anything is queued, then
        start watching the jobs under a name prefix of our own."""
        preflight(plan.alloc, WHO)
        shape = node_shape(plan)
        host = driver_address()
        report = getattr(self._state.sink, "set_backend_state", None)
        owner = self._state.owner
        self._jobs = BatchJobs(
            WHO,
            report=None if report is None else lambda s, d: report(owner, s, d),
            lost=self._lost_in_thread,
        )
        self._jobs.start()
        return shape, host

    async def _submit_jobs(self, opts: dict[str, Any], nodes: int) -> None:
        from dask_jobqueue import SLURMCluster
        from distributed import Client

        state = self._state
        # The engine owns retries: a task whose worker dies fails at once with
        # WorkerLostError instead of being re-run (the scheduler reads its config
        # when it starts, in the first await).
        with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
            cluster = state.cluster = SLURMCluster(asynchronous=True, **opts)
            await cluster
        log.debug("dask: job script\n%s", cluster.job_script())
        cluster.scale(jobs=nodes)
        await cluster  # runs sbatch: its errors surface here
        state.client = await Client(cluster, asynchronous=True, set_as_default=False)
        await state.client.register_plugin(CommandReaper())

    # -- jobs that end under the backend -------------------------------------------
    def _lost_in_thread(self, message: str) -> None:
        """BatchJobs' watch thread: hand the news to the loop."""
        life = self._state.life
        loop = life.loop
        if loop is None or life.closed:
            return
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
            loop.call_soon_threadsafe(self._jobs_lost, message)

    def _jobs_lost(self, message: str) -> None:
        """A job ended under us.  While another one runs, Dask gives its
        workers the queued tasks and fails those that ran on the lost ones
        (``KilledWorker``), which :meth:`why_lost` then names; once none is
        left, fail every unfinished task, and every later one (Dask would queue
        them for ever)."""
        state = self._state
        if state.life.closed:
            return
        match = _JOB_ID.search(message)
        self._jobs_gone.add(match.group(1) if match else message)
        self._last_lost = (message, time.monotonic())
        if self._job_ended is not None:
            self._job_ended.set()
        if len(self._jobs_gone) < self._plan.alloc.nodes:
            log.warning("dask: %s; the other jobs' workers go on", message)
            return
        state.dead = message
        for hook in state.lost_hooks:
            hook(message)
        tasks = list(state.tasks.items())
        if not tasks:
            return
        log.warning("dask: %s; failing %d unfinished task(s)", message, len(tasks))
        self._cancel([uid for uid, _ in tasks])
        sink = state.sink
        assert sink is not None
        for uid, tracked in tasks:
            sink.set_exception(uid, lost_error(tracked.name, message))

    async def why_lost(self) -> str | None:
        """A worker died under a task: give Slurm's reason (walltime, node
        failure) a moment to arrive, and return it if a job ended within that
        moment; a task the loss of every job failed already is left alone."""
        ended = self._job_ended
        if ended is not None and not ended.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(ended.wait(), LOST_GRACE)
        last = self._last_lost
        if last is None or time.monotonic() - last[1] > LOST_GRACE:
            return None  # a worker lost on its own: Dask's own words say it
        return last[0]

    async def close(self) -> None:
        """After the cluster closed: cancel whatever is left of our jobs and wait
        until Slurm lists none, so that shutdown leaves an empty queue."""
        jobs, self._jobs = self._jobs, None
        if jobs is not None:
            left = await asyncio.to_thread(jobs.close)
            if left:
                log.warning("dask: Slurm jobs still listed at shutdown: %s", left)
        self._node_tmp.close()
