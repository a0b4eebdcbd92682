"""The cluster and the client: brought up at start, torn down at shutdown.

A backend either owns its cluster (a loopback LocalCluster, or the SLURMCluster
of an HPC dict: see ``allocation``) or attaches a client of its own to someone
else's scheduler, and closes only what it owns.  Either way it subscribes to a
topic of its own, on which workers publish small results (see ``results``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import dask
from distributed import Client, LocalCluster

from .allocation import SlurmAllocation
from .config import CLOSE_TIMEOUT, CONNECT_TIMEOUT, Settings, address_of
from .healing import KeepWorkers
from .state import DaskState
from .worker import CommandReaper


class Runtime:
    """Opens and closes the cluster and client ``state`` holds."""

    def __init__(self, state: DaskState, allocation: SlurmAllocation | None):
        self._state = state
        self._allocation = allocation

    async def open(self, on_event: Callable[[tuple[float, Any]], None]) -> None:
        """Own or attach to a cluster, and hear its workers' ``on_event``."""
        state = self._state
        if self._allocation is not None:
            await self._allocation.start()
        elif state.settings.owns_cluster:
            await self._start_cluster()
        else:
            await self._connect()
        client = state.client
        assert client is not None
        # Our own topic: the scheduler drops its events when we disconnect.
        client.subscribe_topic(client.id, on_event)
        state.topic = client.id

    async def _start_cluster(self) -> None:
        state = self._state
        opts = _local_options(state.settings)
        # Shutdown removes this directory.  Unless the user chose another, it
        # holds the workers' scratch space (a nanny that SIGKILLs a slow-closing
        # worker leaves its lock files behind), and worker processes list their
        # running commands in it (COMMAND_PIDS_ENV): the CommandReaper cannot
        # kill those of a worker killed that way.
        opts.setdefault("local_directory", state.scratch.make("asyncflow-dask-"))
        if opts.get("processes", True):
            opts["env"] = {**(opts.get("env") or {}), **state.scratch.command_env()}
        # The engine owns retries: a task whose worker dies fails at once with
        # WorkerLostError instead of being re-run (and killing) three more times.
        # (The scheduler reads its config when it starts, in the await.)
        with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
            cluster = state.cluster = LocalCluster(asynchronous=True, **opts)
            await cluster
        cluster.scheduler.add_plugin(KeepWorkers(cluster))
        state.client = await Client(cluster, asynchronous=True, set_as_default=False)
        await state.client.register_plugin(CommandReaper())

    async def _connect(self) -> None:
        settings = self._state.settings
        address, security = address_of(settings.target)
        opts = dict(settings.client_options)
        if security is not None:
            opts.setdefault("security", security)
        opts.setdefault("timeout", CONNECT_TIMEOUT)
        opts.setdefault("set_as_default", False)
        self._state.client = await Client(address, asynchronous=True, **opts)

    async def close(self) -> None:
        """Close the client, then the cluster if owned, its Slurm jobs, and the
        scratch dir with any command a dead worker left running."""
        state = self._state
        client, state.client = state.client, None
        cluster, state.cluster = state.cluster, None
        if client is not None:
            with contextlib.suppress(Exception):
                if client.id in client._event_handlers:
                    # else the scheduler logs a CRITICAL error sending us the
                    # "remove-client" event on the comm we are closing
                    client.unsubscribe_topic(client.id)
                await client.close(timeout=CLOSE_TIMEOUT)
        try:
            if cluster is not None:
                await cluster.close(timeout=CLOSE_TIMEOUT)
        finally:
            # after the cluster's own scancel: wait until Slurm lists no job
            if self._allocation is not None:
                with contextlib.suppress(Exception):
                    await self._allocation.close()
            # Commands outlive a worker the nanny killed, and a driver
            # stopped by Ctrl-C never reached the workers to kill them.
            state.scratch.close()


def _local_options(settings: Settings) -> dict[str, Any]:
    """LocalCluster arguments: the caller's, over loopback-only defaults."""
    opts = dict(settings.cluster_options)
    if opts.get("dashboard_address") is None:
        # No dashboard, and its HTTP server (metrics, health) on an ephemeral
        # loopback port: the default 8787 warns when a second cluster starts.
        sched = dict(opts.get("scheduler_kwargs") or {})
        sched.setdefault("dashboard_address", "127.0.0.1:0")
        sched.setdefault("dashboard", False)
        opts["scheduler_kwargs"] = sched
    if not opts.get("processes", True) and "host" not in settings.user_options:
        opts.pop("host", None)  # inproc addresses name no interface
        # ...so an in-process worker would start its HTTP server (metrics,
        # health) on every interface: pin it to loopback.
        opts.setdefault("worker_dashboard_address", "127.0.0.1:0")
    if "resources" not in opts:
        opts["resources"] = {"CPU": opts.get("threads_per_worker") or 1}
    return opts
