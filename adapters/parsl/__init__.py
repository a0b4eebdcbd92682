"""Parsl: every task goes through a DataFlowKernel, so Parsl's executors and
providers (a local HighThroughputExecutor here, Slurm or PBS blocks elsewhere)
stay in charge of placement, while asyncflow keeps the DAG.

Why the adapter looks the way it does:

* Parsl's own dependency tracking is bypassed: the engine only hands over ready
  work, so each spec becomes one ``dfk.submit`` with plain arguments, and the
  ``AppFuture`` done callback (run on Parsl's result thread) feeds the sink.
* User arguments travel packed inside one positional argument, never as Parsl
  keyword arguments: names such as ``inputs``, ``outputs``, ``stdout`` or
  ``walltime`` mean something to Parsl and must not be reinterpreted.
* For out-of-process executors the adapter pickles function, arguments and
  result itself (cloudpickle where plain pickle would pin something to
  ``__main__``), so serialisation errors name the task as on every other
  backend, and Parsl's dill only moves one bytes object per task, which halves
  its per-task cost.
* ``AppFuture.cancel`` raises ``NotImplementedError`` upstream.  Cancelling is
  therefore arranged by the adapter on the same host: a marker file per
  cancelled task (checked by the worker before it starts anything) and a
  datagram to every worker process of this DFK, whose listener thread calls
  :func:`asyncflow.worker.kill_command` for a running executable or kills its
  own process for a running function (HTEX restarts lost workers).  Workers on
  other hosts are out of reach, and the capabilities say so.
* The default configuration is a loopback-only HighThroughputExecutor whose run
  directory lives in a temp dir that shutdown removes, with Parsl logging at
  WARNING: Parsl's defaults (DEBUG, ``./runinfo``) write 100+ MB per benchmark.
* The reference page's HPC dict (``{'resource': 'slurm', 'queue': ..., 'nodes':
  ...}``) becomes the same kind of executor over Parsl's SlurmProvider: one
  block of ``nodes`` nodes, an interchange the nodes can reach, a preflight that
  refuses an impossible request at once, and the job watched, reported and
  cancelled through :class:`asyncflow.slurm.BatchJobs`.

The adapter is split by job:

``backend``
    :class:`ParslExecutionBackend`: construction, what the executors can do,
    start, the interchange watch, cancel and shutdown;
``runtime``
    one DataFlowKernel shared by the backends built on it: loading it, waiting
    for workers, cleaning it up and reaping its worker blocks;
``config``
    ``local_htex_config``, ``QuietFileLogging`` and the PATH HTEX needs;
``slurm``
    the page's HPC dict translated into a Slurm configuration, and the Slurm
    side of such a backend (preflight, interchange address, its jobs);
``executors``
    what asyncflow knows about each Parsl executor and the resources it offers;
``submit``
    specs turned into ``dfk.submit`` calls, with packed arguments and resource
    specifications;
``results``
    the ``AppFuture`` done callback and Parsl's failures translated into
    asyncflow's errors;
``worker``
    what runs in Parsl workers, imported there by this path;
``cancel``
    both ends of the same-host cancel channel: marker files, the driver's
    control thread and each worker process's listener;
``base``
    the state the parts above share.
"""

from __future__ import annotations

from .backend import _WATCH_PERIOD as _WATCH_PERIOD
from .backend import DEFAULT_CAPABILITIES as DEFAULT_CAPABILITIES
from .backend import ParslExecutionBackend
from .config import QuietFileLogging, local_htex_config

# The old single module's names stay importable from here.  Each is defined once,
# in the module named; patch it there, not here.
from .config import _fix_path as _fix_path
from .runtime import _BROKEN_CLEANUP as _BROKEN_CLEANUP
from .worker import _run_command as _run_command
from .worker import _run_inproc as _run_inproc
from .worker import _run_packed as _run_packed

__all__ = ["ParslExecutionBackend", "QuietFileLogging", "local_htex_config"]
