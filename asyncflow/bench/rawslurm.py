"""Raw Dask and Parsl on a Slurm cluster: the baselines of ``bench --hpc``.

Each is what a user of the runtime writes by hand for the same allocation, with
the runtime's own Slurm API and nothing of asyncflow's: a dask-jobqueue
``SLURMCluster`` scaled to one job per node, or an HTEX over Parsl's
``SlurmProvider`` with one block of ``nodes`` nodes.  The only thing borrowed
is the address the nodes reach this driver at (a user types it in), and the
task API is the local baselines' (:mod:`.raw`), so both sides do the same work.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from typing import Any

from ..hpc import Allocation
from ..slurm import driver_address
from .raw import DaskRaw, ParslRaw

__all__ = ["DaskSlurmRaw", "ParslSlurmRaw"]


def _cores(alloc: Allocation) -> int:
    return alloc.cores_per_node or 1


class DaskSlurmRaw(DaskRaw):
    name = "dask-jobqueue SLURMCluster + client.submit"

    def __init__(self, alloc: Allocation) -> None:
        from dask_jobqueue import SLURMCluster
        from distributed import Client

        self.tmp = tempfile.mkdtemp(prefix="asyncflow-bench-dask-")
        host = driver_address()
        cores = _cores(alloc)
        self.cluster = SLURMCluster(
            queue=alloc.queue,
            account=alloc.account,
            cores=cores,
            processes=cores,
            memory=f"{cores}GB",
            walltime=alloc.walltime_hms,
            python=sys.executable,
            log_directory=self.tmp,
            scheduler_options={"host": host, "dashboard_address": "127.0.0.1:0"},
            worker_extra_args=["--no-dashboard"],
        )
        self.cluster.scale(jobs=alloc.nodes)
        self.client = Client(self.cluster)
        self.client.wait_for_workers(alloc.nodes * cores, timeout=600)

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
            max_workers_per_node=_cores(alloc),
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
