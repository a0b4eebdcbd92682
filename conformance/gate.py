"""Synchronising with running tasks without sleeping.

A :class:`Gate` is a tiny TCP server on 127.0.0.1 that runs on the test's event
loop.  A task (in any thread, process or pilot on this host) connects, says who it
is and its pid, then blocks until the gate answers.  The test awaits arrivals as
events and decides when to release, so "is it running yet?" and "are these two
running at the same time?" are answered without a single sleep.

Run as ``python -m asyncflow.conformance.gate HOST PORT TAG`` it is the same
client as a command line, for executable tasks.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from collections import defaultdict

__all__ = ["Gate", "gate_wait"]

_CLIENT = (
    "import os, socket, sys\n"
    "s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=120)\n"
    "s.sendall(f'{sys.argv[3]} {os.getpid()}\\n'.encode())\n"
    "print(s.makefile('r').readline().strip())\n"
)


def gate_wait(address: tuple[str, int], tag: str, timeout: float = 60.0) -> str:
    """Report to the gate, then block until released.  Returns the gate's word
    ("go"), or "" when the gate closed without one."""
    with socket.create_connection(address, timeout=timeout) as sock:
        sock.sendall(f"{tag} {os.getpid()}\n".encode())
        with sock.makefile("r") as reader:
            return reader.readline().strip()


class Gate:
    """Server side: count arrivals per tag; release them, or let ``barrier``
    release a tag once ``n`` tasks wait at it at the same time."""

    def __init__(self) -> None:
        self._pids: dict[str, list[int]] = defaultdict(list)
        self._writers: dict[str, list[asyncio.StreamWriter]] = defaultdict(list)
        self._changed = asyncio.Condition()
        self._barriers: dict[str, int] = {}
        self._open: set[str] = set()
        self._server: asyncio.base_events.Server | None = None
        self.address: tuple[str, int] = ("127.0.0.1", 0)

    async def __aenter__(self) -> Gate:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.address = self._server.sockets[0].getsockname()[:2]
        return self

    async def __aexit__(self, *exc: object) -> None:
        for writers in self._writers.values():
            for w in writers:
                w.close()
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    def barrier(self, tag: str, n: int) -> None:
        self._barriers[tag] = n

    async def _handle(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        line = (await reader.readline()).decode().split()
        if len(line) != 2:
            writer.close()
            return
        tag, pid = line[0], int(line[1])
        async with self._changed:
            self._pids[tag].append(pid)
            self._writers[tag].append(writer)
            self._changed.notify_all()
        if tag in self._open or self._barriers.get(tag) == len(self._writers[tag]):
            self.release(tag)

    def release(self, tag: str) -> None:
        for w in self._writers.pop(tag, []):
            w.write(b"go\n")
            w.close()

    def open(self, tag: str) -> None:
        """Release everyone waiting at ``tag`` now and whoever arrives later."""
        self._open.add(tag)
        self.release(tag)

    def count(self, tag: str) -> int:
        return len(self._pids.get(tag, ()))

    async def arrived(self, tag: str, n: int = 1) -> list[int]:
        """Wait until ``n`` tasks reported at ``tag``; their pids."""
        async with self._changed:
            await self._changed.wait_for(lambda: len(self._pids[tag]) >= n)
            return list(self._pids[tag])

    def command(self, tag: str) -> list[str]:
        """The command line of an executable that waits at this gate.

        The client is inlined so the process reports within milliseconds of
        starting, without importing asyncflow.
        """
        host, port = self.address
        return [sys.executable, "-S", "-c", _CLIENT, host, str(port), tag]


if __name__ == "__main__":
    host, port, tag = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    print(gate_wait((host, port), tag))
