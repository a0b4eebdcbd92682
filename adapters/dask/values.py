"""Task arguments and results as Dask sees them.

A result left on the cluster is a :class:`DaskRemoteValue` wrapping its Dask
future; before submission, remote values and references to still-running
upstream tasks are swapped for the Dask futures Dask resolves on the worker.
Payload sizes decide what is scattered, how graphs are chunked and which
results are pushed.  These walks are shared by submission and by the worker-side
push, so they live apart from both.

Dask resolves futures inside lists, tuples, sets, dicts and named tuples, but
passes a frozenset through untouched, so a future there would reach the task
as a Future instead of its value.  A frozenset holding one travels as a
:class:`FrozenItems` (a named tuple, which Dask does look inside) and is
rebuilt by :func:`thaw` on the worker.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple

from dask.sizeof import sizeof

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


class FrozenItems(NamedTuple):
    """A frozenset's items on their way to a worker (see the module's doc)."""

    items: tuple[Any, ...]


#: types whose size is not worth asking ``sizeof`` about
SMALL = (int, float, bool, type(None), complex)
MARKERS = frozenset({DaskRemoteValue, UpstreamRef})
_SEQUENCES = (tuple, list, set)


def dask_args(
    spec: TaskSpec, native: Callable[[Any], Any]
) -> tuple[tuple[Any, ...], dict[str, Any], bool]:
    """``spec``'s arguments with each marker replaced by ``native(marker)``, and
    whether the worker must :func:`thaw` them (see the module's doc)."""
    args, kwargs = spec.args, spec.kwargs
    if not any(
        contains(tuple(inner), MARKERS) for inner in find((args, kwargs), frozenset)
    ):
        return replace(args, MARKERS, native), replace(kwargs, MARKERS, native), False
    return _tagged(args, native), _tagged(kwargs, native), True


def _tagged(obj: Any, native: Callable[[Any], Any]) -> Any:
    t = type(obj)
    if t in MARKERS:
        return native(obj)
    if t is frozenset:
        return _tagged_frozenset(obj, native)
    if t in _SEQUENCES:
        return t(_tagged(v, native) for v in obj)
    if t is dict:
        return {k: _tagged(v, native) for k, v in obj.items()}
    return obj


def _tagged_frozenset(obj: frozenset[Any], native: Callable[[Any], Any]) -> Any:
    """A frozenset holding a marker travels as :class:`FrozenItems`: the native
    values replacing the markers need not be hashable."""
    if not contains(tuple(obj), MARKERS):
        return obj
    return FrozenItems(tuple(_tagged(v, native) for v in obj))


def thaw(obj: Any) -> Any:
    """``obj`` with every :class:`FrozenItems` turned back into its frozenset."""
    return replace(obj, FrozenItems, _melt)


def _melt(frozen: FrozenItems) -> frozenset[Any]:
    return frozenset(replace(frozen.items, FrozenItems, _melt))


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
