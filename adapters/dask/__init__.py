"""Dask's scheduler already does what asyncflow needs from a cluster: placement,
data locality and worker resources.  So this adapter adds as little as it can and
keeps everything on the engine's event loop: an asynchronous ``Client`` submits
each loop turn's ready tasks as one ``client.map`` per kind of task (one
``update-graph`` message), and each completion is a coroutine waking on the Dask
future's own event: no thread and no polling.

Why results travel two ways: a Dask completion says only "done"; the value stays
on the worker, and fetching it is a scheduler round trip that costs as much CPU
as running a no-op task.  Fetching every small result that way halves a
fan-out's throughput.  So the worker-side wrapper publishes a *small* result
(pickled, at most ``PUSH_BYTES``) as a Dask event on the client's own topic; it
reaches the client on the same stream just before the completion, and the task
is reported with its plain value.  A bigger result is reported as a
:class:`DaskRemoteValue` wrapping the Dask future: a downstream task on this
backend gets that future as its argument, so the data moves worker to worker and
never through the driver, and it reaches the driver only when someone awaits it
(the fetches of one loop turn share one ``client.gather``).

Ownership: ``DaskExecutionBackend()`` starts a loopback ``LocalCluster`` (its
keyword arguments override the defaults) and closes it at shutdown.  Given an
address, a ``Client`` or a cluster object (``LocalCluster``, a dask-jobqueue
cluster, ...), it opens a client of its own to that scheduler and closes only
that client: the cluster and the caller's client stay up.  Given the reference
page's HPC dict (``{'resource': 'slurm', 'queue': ..., 'nodes': ...}``), it
submits and owns a dask-jobqueue SLURMCluster of one job per node, and cancels
the jobs at shutdown.

Resources map onto Dask worker resources: ``cores`` onto ``CPU`` when the
workers advertise it (the owned cluster does), else onto the worker's thread
count; ``gpus`` onto ``GPU``; ``memory`` (MB) onto ``MEMORY`` (bytes) when
advertised, else onto the worker's memory limit.  A request that no connected
worker could ever meet fails at once with ResourceUnavailableError instead of
waiting in the scheduler forever.

The adapter is a few collaborators sharing one state object, by job:

``backend``
    :class:`DaskExecutionBackend`, the protocol: it owns the state and the
    parts below, and decides the order in which they start and stop;
``config`` and ``state``
    what the constructor decided (own a cluster or attach, and the ``info`` to
    report), and the bookkeeping every part shares;
``runtime``
    owning a LocalCluster or attaching a client of our own, and closing them;
``slurm`` and ``allocation``
    the page's HPC dict translated into SLURMCluster arguments, and owning that
    cluster: Slurm asked first, its jobs watched, a job that ends failing the
    tasks it takes away;
``submit`` and ``resources``
    batching ready tasks into ``client.map`` calls, piped and scattered
    arguments, and mapping ``Resources`` onto Dask worker resources;
``chunks``
    many calls of one function in one batch sent several to a Dask task
    through the toolkit's chunk queue (``chunking=False`` turns it off);
``results`` and ``cancel``
    watching completions, pushed small results, batched fetches of the values
    left on the cluster; cancelling in Dask and killing running commands;
``values``
    :class:`DaskRemoteValue` and the walks over task arguments (swapping in
    Dask futures, sizing payloads);
``worker``
    the functions Dask runs on its workers, imported there by this path;
``errors``
    Dask's failures translated into asyncflow's errors.
"""

from __future__ import annotations

from .backend import DaskExecutionBackend
from .values import DaskRemoteValue

__all__ = ["DaskExecutionBackend", "DaskRemoteValue"]
