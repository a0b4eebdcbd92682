"""Noticing, without polling, that the Ray head died.

When the head's GCS or raylet dies, Ray neither fails the driver's in-flight
ObjectRefs nor tells the driver: it retries the GCS for
``gcs_rpc_server_reconnect_timeout_s`` (60 s by default) and then ends the whole
driver process.  Until then every unfinished future would simply hang.  So the
adapter opens a pidfd on each head process it can see on this machine (Linux 5.3
and later) and lets the event loop watch it.  The moment one exits, every task
in flight fails with :class:`WorkerLostError` naming the process, later
submissions fail at once, and shutdown skips the calls that would wait on the
dead GCS.  A head on another machine cannot be watched this way; there Ray's own
timeout is the bound.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
from typing import Any

import ray

import psutil  # isort: skip  (after ray, which can provide a vendored copy)

from ...errors import WorkerLostError
from .state import RayState, log

__all__ = ["HeadWatch"]

_HEAD = ("gcs_server", "raylet")


class HeadWatch:
    """Fails the tasks in flight the moment the Ray head's processes exit."""

    def __init__(self, state: RayState):
        self._state = state
        self._pidfds: list[int] = []

    def watch(self, owned: bool) -> None:
        """Watch the head's processes; ``owned``: a Ray this backend started."""
        loop = self._state.life.loop
        if loop is None or not hasattr(os, "pidfd_open"):
            return
        for name, pid in self._head_pids(owned):
            try:
                fd = os.pidfd_open(pid)
            except OSError:
                continue  # gone already, or not ours to watch
            self._pidfds.append(fd)
            loop.add_reader(fd, self._head_died, name, pid)

    def _head_pids(self, owned: bool) -> list[tuple[str, int]]:
        """The GCS and raylet of a Ray this backend started (its children), or
        the GCS of an attached Ray whose head runs on this machine."""
        found: list[tuple[str, int]] = []
        try:
            if owned:
                for proc in psutil.Process().children(recursive=True):
                    with contextlib.suppress(psutil.Error):
                        if proc.name() in _HEAD:
                            found.append((proc.name(), proc.pid))
                return found
            if self._state.client:
                return found  # Ray Client: the head is a server somewhere else
            host, _, port = ray.get_runtime_context().gcs_address.rpartition(":")
            if not _is_local(host):
                return found
            for conn in psutil.net_connections(kind="tcp"):
                if (
                    conn.status == psutil.CONN_LISTEN
                    and conn.laddr
                    and conn.laddr.port == int(port)
                    and conn.pid
                ):
                    found.append(("gcs_server", conn.pid))
        except Exception:  # best effort: without it Ray's own timeout applies
            log.debug("ray: cannot find the head's processes", exc_info=True)
        return found

    def _head_died(self, name: str, pid: int) -> None:
        self.unwatch()
        state = self._state
        if state.life.closed:
            return
        state.lost = (
            f"the Ray head's {name} (pid {pid}) exited, so Ray can neither run nor "
            "report the task; restart Ray and run the workflow again"
        )
        log.error("ray: %s", state.lost)
        sink = state.sink
        assert sink is not None
        tasks, state.tasks = state.tasks, {}
        for uid, task in tasks.items():
            error = WorkerLostError(f"task {task.name!r}: {state.lost}")
            sink.set_exception(uid, error)
        for hook in list(state.lost_hooks):
            hook(state.lost)

    def unwatch(self) -> None:
        fds, self._pidfds = self._pidfds, []
        loop = self._state.life.loop
        for fd in fds:
            if loop is not None and not loop.is_closed():
                loop.remove_reader(fd)
            os.close(fd)


def _is_local(host: str) -> bool:
    try:
        if ipaddress.ip_address(host).is_loopback:
            return True
    except ValueError:
        return host == "localhost"
    addresses: set[Any] = set()
    for addrs in psutil.net_if_addrs().values():
        addresses.update(a.address for a in addrs)
    return host in addresses
