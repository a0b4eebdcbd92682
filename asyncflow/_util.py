"""Small helpers shared by the engine and the adapters."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

__all__ = ["run_in_thread"]


async def run_in_thread(
    fn: Callable[..., T], *args: Any, name: str = "asyncflow-io"
) -> T:
    """Run a blocking call in a thread of its own and await it.

    Unlike ``asyncio.to_thread`` this leaves no pooled thread behind, which matters
    for shutdown paths that promise no thread survives them.
    """
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[T] = loop.create_future()

    def deliver(ok: bool, value: Any) -> None:
        if fut.done():
            return
        if ok:
            fut.set_result(value)
        else:
            fut.set_exception(value)

    def target() -> None:
        try:
            result = fn(*args)
        except BaseException as exc:
            loop.call_soon_threadsafe(deliver, False, exc)
        else:
            loop.call_soon_threadsafe(deliver, True, result)

    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    try:
        return await fut
    finally:
        if not thread.is_alive() or fut.done():
            thread.join()
