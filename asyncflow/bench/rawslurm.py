"""Raw Dask and Parsl on a Slurm cluster: the baselines of ``bench --hpc``.

Each is what a user of the runtime writes by hand for the same allocation, with
the runtime's own Slurm API and nothing of asyncflow's: a dask-jobqueue
``SLURMCluster`` scaled to one job per node, or an HTEX over Parsl's
``SlurmProvider`` with one block of ``nodes`` nodes.  The only thing borrowed
is the address the nodes reach this driver at (a user types it in), and the
task API is the local baselines' (:mod:`.raw`), so both sides do the same work.

Both sides get the same workers (the Dask job's shape is the adapter's, with
``sinfo`` asked for what the dict leaves out), and both are timed only once
all of them have joined: :func:`joined` counts them on either side, and the
start-up figure includes that wait on both (see :mod:`.child`).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping
from typing import Any

from ..hpc import Allocation
from ..slurm import driver_address
from .raw import DaskRaw, ParslRaw

__all__ = ["DaskSlurmRaw", "ParslSlurmRaw", "expected_workers", "parsl_managers"]

#: seconds every worker of the allocation gets to join before timing starts
JOIN_TIMEOUT = 600.0


def dask_shape(hpc: Mapping[str, Any]) -> Any:
    """The adapter's shape of one Dask job for ``hpc`` (asks ``sinfo`` for what
    the dict leaves out), so that the raw cluster gets the same workers."""
    from asyncflow.adapters.dask.slurm import SlurmPlan, node_shape

    return node_shape(SlurmPlan.from_mapping(hpc))


def expected_workers(backend: str, hpc: Mapping[str, Any]) -> int | None:
    """What must have joined before timing: Dask worker processes, or Parsl
    managers (one per node; the block starts them all at once)."""
    alloc, _ = Allocation.from_mapping(hpc, "asyncflow bench --hpc")
    if backend == "dask":
        return int(alloc.nodes * dask_shape(hpc).processes)
    if backend == "parsl":
        return alloc.nodes
    return None


def parsl_managers(dfk: Any) -> int:
    """Parsl managers connected to the HTEX executors of ``dfk``."""
    from parsl.executors import HighThroughputExecutor

    return sum(
        len(ex.connected_managers())
        for ex in dfk.executors.values()
        if isinstance(ex, HighThroughputExecutor)
    )


def wait_parsl(dfk: Any, n: int, timeout: float = JOIN_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while parsl_managers(dfk) < n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"raw parsl: {n} manager(s) not connected in time")
        time.sleep(0.1)


class DaskSlurmRaw(DaskRaw):
    name = "dask-jobqueue SLURMCluster + client.submit"

    def __init__(self, alloc: Allocation, hpc: Mapping[str, Any]) -> None:
        from dask_jobqueue import SLURMCluster
        from distributed import Client

        self.tmp = tempfile.mkdtemp(prefix="asyncflow-bench-dask-")
        host = driver_address()
        shape = dask_shape(hpc)
        self.cluster = SLURMCluster(
            queue=alloc.queue,
            account=alloc.account,
            cores=shape.cores,
            processes=shape.processes,
            memory=f"{shape.memory}MiB",
            job_mem=f"{shape.memory}M",  # Slurm's M is MiB: fits RealMemory
            walltime=alloc.walltime_hms,
            python=sys.executable,
            log_directory=self.tmp,
            scheduler_options={"host": host, "dashboard_address": "127.0.0.1:0"},
            worker_extra_args=["--no-dashboard"],
        )
        self.cluster.scale(jobs=alloc.nodes)
        self.client = Client(self.cluster)
        self.client.wait_for_workers(alloc.nodes * shape.processes, JOIN_TIMEOUT)

    def shutdown(self) -> None:
        try:
            super().shutdown()
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)


class ParslSlurmRaw(ParslRaw):
    name = "parsl SlurmProvider + python_app"

    def __init__(self, alloc: Allocation) -> None:
        import logging

        import parsl
        from parsl.config import Config
        from parsl.executors import HighThroughputExecutor
        from parsl.launchers import SrunLauncher
        from parsl.providers import SlurmProvider

        logging.getLogger("parsl").setLevel(logging.WARNING)
        bindir = os.path.dirname(sys.executable)
        os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
        self.parsl = parsl
        self.tmp = tempfile.mkdtemp(prefix="asyncflow-bench-parsl-")
        provider = SlurmProvider(
            partition=alloc.queue,
            account=alloc.account,
            nodes_per_block=alloc.nodes,
            cores_per_node=alloc.cores_per_node,
            walltime=alloc.walltime_hms,
            exclusive=False,
            init_blocks=1,
            min_blocks=1,
            max_blocks=1,
            launcher=SrunLauncher(),
            worker_init=f'export PATH={bindir}:"$PATH"',
        )
        htex = HighThroughputExecutor(
            label="htex",
            address=driver_address(),
            # None: Parsl's default, the node's cores, as the adapter leaves it
            max_workers_per_node=alloc.cores_per_node,
            provider=provider,
        )
        config = Config(
            executors=[htex],
            run_dir=self.tmp,
            strategy_period=0.5,
            initialize_logging=False,
        )
        self.dfk = parsl.load(config)
        self.apps: dict[Any, Any] = {}
        wait_parsl(self.dfk, alloc.nodes)  # every node's manager, as Dask's workers
