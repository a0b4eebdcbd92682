"""The reference page's HPC dict, translated for Parsl.

``ParslExecutionBackend({'resource': 'slurm', 'queue': ..., 'nodes': ...})``
must mean what the same dict means to every other batch runtime, so the dict is
checked by :class:`asyncflow.hpc.Allocation` and turned into the configuration
a Parsl user would write for a Slurm cluster: one HighThroughputExecutor whose
single block is one Slurm job of ``nodes`` nodes, a worker pool per node started
by ``srun``.  The mapping:

================  ==========================================================
``queue``         ``SlurmProvider(partition=...)``
``account``       ``SlurmProvider(account=...)`` (``project`` is the same)
``nodes``         ``nodes_per_block``; exactly one block (init/min/max 1)
``cores_per_node``  ``SlurmProvider(cores_per_node=...)`` and that many HTEX
                  workers per node (one core each)
``gpus_per_node`` ``SlurmProvider(gpus_per_node=...)`` and HTEX's
                  ``available_accelerators``: one GPU pinned per worker, so
                  GPU nodes run ``gpus_per_node`` workers each
``walltime``      minutes, as Slurm's ``HH:MM:SS``
``worker_init``   (Parsl only) shell lines the batch script runs before it
                  starts the workers, e.g. ``module load ...`` (``srun``
                  passes the environment on to every node)
================  ==========================================================

What a hand-written configuration usually gets wrong is done here once:

* the interchange listens on the login node's address toward the cluster
  (:func:`asyncflow.slurm.driver_address`), not 127.0.0.1, which the nodes would
  take for their own loopback, and not every interface, which would expose it
  beyond the cluster (its traffic is CurveZMQ-encrypted, Parsl's default);
* the workers get this interpreter's ``bin/`` and ``sys.path``, so that they run
  the driver's Python and import what it imports;
* the run directory is a temp dir under the current directory: the nodes read
  the submit script's output paths, the worker command file and the CurveZMQ
  certificates from it, so it must be on the filesystem they share with the
  login node, which ``/tmp`` usually is not (Parsl's own default, ``./runinfo``,
  is there for the same reason).  Shutdown removes it;
* before anything is submitted, :func:`asyncflow.slurm.preflight` asks Slurm
  whether it could ever run the job, so an impossible request fails at once
  with Slurm's reason instead of waiting in the queue forever;
* every job carries the :class:`asyncflow.slurm.BatchJobs` name prefix, which
  reports the job waiting in the queue, notices it ending under the backend
  (walltime: Parsl itself would start no new block and leave the tasks waiting)
  and cancels it at shutdown even if Parsl's own ``scancel`` failed.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from typing import Any

from parsl.config import Config
from parsl.executors import HighThroughputExecutor
from parsl.launchers import SrunLauncher
from parsl.providers import SlurmProvider

from ...errors import TaskDefinitionError
from ...hpc import SLURM, Allocation
from ...slurm import BatchJobs, driver_address, node_tmpdir, preflight
from .config import driver_python_lines, interchange_command, one_block_config
from .state import log

WHO = "ParslExecutionBackend"
#: keys Parsl takes besides the page's
EXTRAS = frozenset({"worker_init"})
#: the executor's label: tasks pick it with ``options={"executor": "htex"}``
LABEL = "htex"
#: seconds Parsl waits for sbatch, squeue and scancel (its default, 10, is
#: short for a busy controller)
_CMD_TIMEOUT = 60

Report = Callable[[str, str], None]
Lost = Callable[[str], None]


class _NamedSlurmProvider(SlurmProvider):
    """Parsl's SlurmProvider, whose job names start with :attr:`name_prefix`.

    Parsl names a block's job ``parsl.<label>.block-<n>``; the prefix is what
    :class:`BatchJobs` finds the backend's jobs by.  It is set here rather than
    in the executor label, which users route tasks by and which must stay
    ``htex``.
    """

    name_prefix = ""

    def submit(
        self, command: str, tasks_per_node: int, job_name: str = "parsl.slurm"
    ) -> str:
        if self.name_prefix:
            job_name = f"{self.name_prefix}.{job_name}"
        job_id: str = super().submit(command, tasks_per_node, job_name)
        return job_id


def _worker_init(user: str, scratch: str | None) -> str:
    """The user's lines, then this interpreter's ``bin/`` and ``sys.path``
    first (the workers must run the driver's Python, whatever a module loaded),
    and a ``TMPDIR`` of the backend's own under the node's: each worker pool's
    multiprocessing manager leaves a ``pymp-*`` directory there when Slurm
    stops it, which shutdown then removes where it can see it."""
    lines = [*([user] if user else []), *driver_python_lines()]
    if scratch is not None:
        lines.append(node_tmpdir(scratch))
    return "\n".join(lines)


def slurm_htex_config(
    alloc: Allocation,
    run_dir: str = "runinfo",
    *,
    worker_init: str = "",
    scratch: str | None = None,
    log_level: int = logging.WARNING,
) -> Config:
    """The Parsl configuration ``alloc`` stands for (see the module docstring).

    The interchange's address is a placeholder until :meth:`SlurmBlocks.start`
    asks Slurm for the right one; nothing listens before then.  ``scratch``
    names the workers' ``TMPDIR`` (its base name, under the node's own).
    """
    provider = _NamedSlurmProvider(
        partition=alloc.queue,
        account=alloc.account,
        nodes_per_block=alloc.nodes,
        cores_per_node=alloc.cores_per_node,
        gpus_per_node=alloc.gpus_per_node or None,
        init_blocks=1,
        min_blocks=1,
        max_blocks=1,
        walltime=alloc.walltime_hms,
        exclusive=False,
        launcher=SrunLauncher(debug=False),
        worker_init=_worker_init(worker_init, scratch),
        cmd_timeout=_CMD_TIMEOUT,
    )
    htex = HighThroughputExecutor(
        label=LABEL,
        address="127.0.0.1",  # replaced by driver_address() in start
        loopback_address="127.0.0.1",
        max_workers_per_node=alloc.cores_per_node,
        cores_per_worker=1,
        available_accelerators=alloc.gpus_per_node,
        heartbeat_period=5,
        heartbeat_threshold=60,
        interchange_launch_cmd=interchange_command(),
        provider=provider,
    )
    return one_block_config(htex, run_dir, log_level)


class SlurmBlocks:
    """The Slurm side of a backend built from the page's dict.

    Built with the backend (so a bad dict fails in the constructor, and the
    backend can declare what the executor offers); :meth:`start` runs in the
    thread that loads the DataFlowKernel, before it, and :meth:`close` after
    Parsl's cleanup.  ``report`` and ``lost`` are set by the backend once it
    has a sink (:meth:`connect`).
    """

    def __init__(self, spec: Mapping[str, Any], who: str = WHO) -> None:
        alloc, rest = Allocation.from_mapping(spec, who, extra=EXTRAS)
        alloc.require(who, SLURM)
        worker_init = rest.pop("worker_init", "") or ""
        if not isinstance(worker_init, str):
            raise TaskDefinitionError(
                f"{who}: 'worker_init' must be shell lines as a str, got "
                f"{type(worker_init).__name__}"
            )
        self.alloc = alloc
        self.who = who
        self._worker_init = worker_init
        self.config = slurm_htex_config(alloc, worker_init=worker_init)
        executor = self.config.executors[0]
        assert isinstance(executor, HighThroughputExecutor)
        assert isinstance(executor.provider, _NamedSlurmProvider)
        self.executor = executor
        self.provider = executor.provider
        #: the run directory and the workers' TMPDIR, made by start: a backend
        #: that never starts leaves nothing on disk
        self.tmpdir: str | None = None
        self.scratch: str | None = None
        self.jobs: BatchJobs | None = None
        self._report: Report | None = None
        self._lost: Lost | None = None

    def connect(self, report: Report | None, lost: Lost | None) -> None:
        self._report = report
        self._lost = lost

    def start(self) -> None:
        """Check the request with Slurm, point the interchange at the cluster
        network, make the directories and start watching the jobs (blocking;
        before the DFK loads, whose first strategy tick submits the block).
        On failure the caller still calls :meth:`close`."""
        preflight(self.alloc, self.who)
        address = driver_address()
        self.executor.address = address
        self.executor.all_addresses = {address}
        self.tmpdir = tempfile.mkdtemp(prefix=".asyncflow-parsl-", dir=os.getcwd())
        self.scratch = tempfile.mkdtemp(prefix="asyncflow-parsl-")
        self.config.run_dir = os.path.join(self.tmpdir, "runinfo")
        # as SlurmProvider keeps it: the lines it appends must start on their own
        self.provider.worker_init = _worker_init(self._worker_init, self.scratch) + "\n"
        jobs = BatchJobs(self.who, report=self._report, lost=self._on_lost)
        self.provider.name_prefix = jobs.prefix
        jobs.start()
        self.jobs = jobs

    def _on_lost(self, message: str) -> None:
        """A job ended under the backend.  Unless it ran out of time, why is in
        its stderr (a worker pool that could not start, say), and the run
        directory holding it is gone after shutdown: quote it now."""
        lost = self._lost
        if lost is None:
            return
        if "walltime" not in message:
            tail = self._stderr_tail()
            if tail:
                message += f"; the job's stderr ends with: {tail}"
        lost(message)

    def _stderr_tail(self, lines: int = 5) -> str:
        out: list[str] = []
        for job in list(self.provider.resources.values()):
            try:
                with open(job["job_stderr_path"], errors="replace") as f:
                    text = f.read()[-2000:]
            except (OSError, KeyError, TypeError):
                continue
            out.extend(line for line in text.splitlines()[-lines:] if line.strip())
        return " | ".join(out)[-600:]

    def close(self) -> None:
        """Cancel whatever job is left and wait until Slurm says it is gone;
        only then remove the directories, which a finishing job still writes."""
        jobs, self.jobs = self.jobs, None
        left = jobs.close() if jobs is not None else []
        for path in (self.scratch, self.tmpdir):
            if path is not None:
                shutil.rmtree(path, ignore_errors=True)
        self.scratch = self.tmpdir = None
        if left:
            log.warning(
                "%s: Slurm jobs still in the queue after shutdown: %s; cancel them "
                "with scancel",
                self.who,
                " ".join(j.id for j in left),
            )
