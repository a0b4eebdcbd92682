"""Task bodies the conformance suite runs.

They live at module level in an installed module so that every runtime can ship
them to its workers by reference.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from typing import Any

from .gate import gate_wait

__all__ = [
    "CustomError",
    "aadd",
    "add",
    "boom",
    "count_lines",
    "exit_worker",
    "fail_at_gate",
    "flaky",
    "gate_wait",
    "getpid",
    "hold",
    "inc",
    "make_bytes",
    "nbytes",
    "pack",
    "raise_custom",
    "recurse",
    "total",
    "touch",
]


class CustomError(Exception):
    """A user exception type the suite expects back unchanged."""

    def __init__(self, message: str, code: int):
        super().__init__(message, code)
        self.code = code


def add(a: Any, b: Any) -> Any:
    return a + b


async def aadd(a: Any, b: Any) -> Any:
    await asyncio.sleep(0)
    return a + b


def inc(x: int) -> int:
    return x + 1


def total(*xs: int) -> int:
    return sum(xs)


def pack(*args: Any, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
    return args, kwargs


def boom(message: str = "boom") -> None:
    raise ValueError(message)


def raise_custom(message: str, code: int) -> None:
    raise CustomError(message, code)


def make_bytes(n: int) -> bytes:
    return b"x" * n


def nbytes(data: bytes) -> int:
    return len(data)


def flaky(path: str, failures: int) -> int:
    """Fail ``failures`` times, then return the attempt number (1-based)."""
    with open(path, "a") as f:
        f.write("attempt\n")
    attempts = count_lines(path)
    if attempts <= failures:
        raise RuntimeError(f"planned failure {attempts} of {failures}")
    return attempts


def count_lines(path: str) -> int:
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        return sum(1 for _ in f)


def recurse(n: int) -> int:
    return recurse(n + 1)


def touch(path: str, *upstreams: Any) -> str:
    """Leave a marker: the trace of a task the test expects never to run."""
    with open(path, "a") as f:
        f.write(f"{os.getpid()}\n")
    return path


def fail_at_gate(address: tuple[str, int], tag: str) -> None:
    """Wait at the gate, then fail: an upstream still running while its
    dependents are handed over."""
    gate_wait(address, tag)
    raise ValueError(f"{tag}: planned failure")


def getpid() -> int:
    return os.getpid()


def exit_worker(driver_pid: int) -> str:
    """End the worker process at once, as a crash would.  Never the driver's:
    that would end the test run, so there it only says where it ran."""
    if os.getpid() == driver_pid:
        return "driver"
    os._exit(1)


def hold(address: tuple[str, int], marker: str, limit: float = 120.0) -> str:
    """Stay connected to the test for up to ``limit`` seconds, then write
    ``marker``.

    The connection closes only when this function returns or its process dies,
    so the test learns without sleeping that it stopped, and the marker that it
    stopped before finishing.  It waits in 50 ms steps, so that an interrupt
    raised in this thread lands, and ends early when the test closes its side.
    """
    with socket.create_connection(address, timeout=limit) as sock:
        sock.sendall(f"{os.getpid()}\n".encode())
        sock.settimeout(0.05)
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            try:
                sock.recv(1)  # b"" (closed) or data: the test let go
                break
            except TimeoutError:
                continue
        touch(marker)
    return marker
