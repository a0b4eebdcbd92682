"""Task bodies the conformance suite runs.

They live at module level in an installed module so that every runtime can ship
them to its workers by reference.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from .gate import gate_wait

__all__ = [
    "CustomError",
    "aadd",
    "add",
    "boom",
    "count_lines",
    "flaky",
    "gate_wait",
    "inc",
    "make_bytes",
    "nbytes",
    "pack",
    "raise_custom",
    "recurse",
    "total",
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
