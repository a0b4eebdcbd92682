"""Parsl: every task goes through a DataFlowKernel, so Parsl's executors and
providers (a local HighThroughputExecutor here, Slurm or PBS blocks elsewhere)
stay in charge of placement, while asyncflow keeps the DAG.

Why the adapter looks the way it does:

* Parsl's own dependency tracking is bypassed: the engine only hands over ready
  work, so each spec becomes one ``dfk.submit`` with plain arguments, and the
  ``AppFuture`` done callback (run on Parsl's result thread) feeds the sink.
* Except for short function tasks in bulk: on an HTEX, many calls of one
  function in one batch travel several to a Parsl task, and a chain called in
  one go runs on inside one worker (``chunks``), because a Parsl task costs
  about a millisecond of driver and interchange work.
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
  :func:`asyncflow.commands.kill_command` for a running executable or kills its
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

The adapter is a few collaborators sharing one explicit state object:

``backend``
    :class:`ParslExecutionBackend`, the protocol class: construction, start and
    shutdown, and delegation to the parts below;
``state``
    the bookkeeping they share (sink, DFK, tasks in flight, cancelled tasks);
``runtime``
    one DataFlowKernel shared by the backends built on it: choosing and loading
    it, waiting for workers, cleaning it up and reaping its worker blocks;
``config``
    ``local_htex_config``, ``QuietFileLogging`` and the PATH HTEX needs;
``slurm``
    the page's HPC dict translated into a Slurm configuration, and the Slurm
    side of such a backend (preflight, interchange address, its jobs);
``executors``
    what asyncflow knows about each Parsl executor, the resources it offers
    and the capabilities that follow;
``submit``
    specs turned into ``dfk.submit`` calls, with packed arguments and resource
    specifications;
``chunks``
    short function tasks sent several to a Parsl task through the toolkit's
    chunk queue, the only place piped tasks wait for their upstreams;
``results``
    the ``AppFuture`` done callback and Parsl's failures translated into
    asyncflow's errors; executors that can run no more tasks (a dead
    interchange, an ended Slurm job) failing their tasks at once;
``worker``
    what runs in Parsl workers, imported there by this path;
``cancel``
    both ends of the same-host cancel channel: marker files, the driver's
    control thread and each worker process's listener.
"""

from __future__ import annotations

from .backend import ParslExecutionBackend
from .config import QuietFileLogging, local_htex_config

__all__ = ["ParslExecutionBackend", "QuietFileLogging", "local_htex_config"]
