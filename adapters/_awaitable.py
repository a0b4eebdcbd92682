"""The awaitable construction forms radical.asyncflow scripts use.

radical.asyncflow backends are built with ``backend = await Backend(...)`` or
``await Backend.create(...)``, and some scripts hold one in ``async with``.  A
script moved to asyncflow by changing its imports only must keep running, so
every in-tree adapter inherits these forms from :class:`AwaitableBackend`.

Construction here stays synchronous: the engine starts a backend's runtime when
it first needs it (or in ``WorkflowEngine.start``), so awaiting a backend has
nothing left to wait for and hands back the object itself.  ``async with``
shuts the backend down on exit, which is harmless after an engine has already
done so (``shutdown()`` is idempotent on every adapter).
"""

from __future__ import annotations

from collections.abc import Generator
from typing import TYPE_CHECKING, Any, Self, TypeVar

__all__ = ["AwaitableBackend"]

_T = TypeVar("_T")


async def _itself(obj: _T) -> _T:
    return obj


class AwaitableBackend:
    """Mixin giving a backend ``await B(...)``, ``await B.create(...)`` and
    ``async with B(...) as b``.

    It adds no state and only these four names, so it can sit last among an
    adapter's bases without shadowing anything the adapter defines.
    """

    __slots__ = ()

    if TYPE_CHECKING:

        async def shutdown(self) -> None: ...

    def __await__(self) -> Generator[Any, None, Self]:
        return _itself(self).__await__()

    @classmethod
    async def create(cls, *args: Any, **kwargs: Any) -> Self:
        """``cls(*args, **kwargs)``, for scripts that write
        ``await Backend.create(...)``."""
        return cls(*args, **kwargs)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.shutdown()
