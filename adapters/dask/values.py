"""Task arguments and results as Dask sees them.

A result left on the cluster is a :class:`DaskRemoteValue` wrapping its Dask
future; before submission, remote values and references to still-running
upstream tasks are swapped for the Dask futures Dask resolves on the worker.
Payload sizes decide what is scattered, how graphs are chunked and which
results are pushed.  These walks are shared by submission and by the worker-side
push, so they live apart from both.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from dask.sizeof import sizeof

from ...errors import TaskDefinitionError
from ...protocol import ExecutionBackend, RemoteValue, UpstreamRef
from ...spec import TaskSpec
from ...walk import contains, find, replace

MB = 2**20


class DaskRemoteValue(RemoteValue):
    """A task result kept on the Dask workers; ``handle`` is the Dask future."""

    __slots__ = ("_fetch",)

    def __init__(
        self,
        owner: ExecutionBackend,
        handle: Any,
        fetch: Callable[[Any], Awaitable[Any]],
    ):
        super().__init__(owner, handle)
        self._fetch = fetch  # the owner's batched fetch

    async def fetch(self) -> Any:
        return await self._fetch(self.handle)


#: types whose size is not worth asking ``sizeof`` about
SMALL = (int, float, bool, type(None), complex)
MARKERS = frozenset({DaskRemoteValue, UpstreamRef})


def dask_args(
    spec: TaskSpec, native: Callable[[Any], Any]
) -> tuple[tuple[Any, ...], dict[str, Any], bool]:
    """``spec``'s arguments with each marker replaced by ``native(marker)``, and
    whether the worker must rebuild frozensets in them (never, yet).

    Dask does not look inside a frozenset, so a result there is refused."""
    args, kwargs = spec.args, spec.kwargs
    if any(
        contains(tuple(inner), MARKERS) for inner in find((args, kwargs), frozenset)
    ):
        raise TaskDefinitionError(
            f"task {spec.name!r}: Dask does not look inside a frozenset for the "
            "results it must pass; put them in a tuple, list or set instead"
        )
    return replace(args, MARKERS, native), replace(kwargs, MARKERS, native), False


def upstream_uids(obj: Any, out: set[str]) -> None:
    """Add the uids of the running upstreams ``obj`` refers to to ``out``."""
    out.update(ref.uid for ref in find(obj, UpstreamRef))


def has_remote(obj: Any) -> bool:
    return contains(obj, MARKERS)


def payload(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    """Roughly how many bytes the arguments take in a task graph."""
    n = 0
    for a in args:
        n += size_of(a)
    if kwargs:
        for v in kwargs.values():
            n += size_of(v)
    return n


def size_of(obj: Any) -> int:
    t = type(obj)
    if t in SMALL:
        return 32
    if t is str or t is bytes:
        return len(obj)
    if t is DaskRemoteValue or t is UpstreamRef:
        return 64
    return int(sizeof(obj))
