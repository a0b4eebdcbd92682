"""Task arguments and results as Dask sees them.

A result left on the cluster is a :class:`DaskRemoteValue` wrapping its Dask
future; before submission, remote values and references to still-running
upstream tasks are swapped for the Dask futures Dask resolves on the worker.
Payload sizes decide what is scattered, how graphs are chunked and which
results are pushed.  These walks are shared by submission and by the worker-side
push, so they live apart from both.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

from dask.sizeof import sizeof

from ...errors import TaskDefinitionError, UpstreamGone
from ...protocol import RemoteValue, UpstreamRef
from ...walk import contains, find, replace

if TYPE_CHECKING:
    from .backend import DaskExecutionBackend
    from .base import _DaskBase

MB = 2**20


class DaskRemoteValue(RemoteValue):
    """A task result kept on the Dask workers; ``handle`` is the Dask future."""

    __slots__ = ()

    async def fetch(self) -> Any:
        owner = cast("DaskExecutionBackend", self.owner)
        return await owner._fetch(self.handle)


_SMALL = (int, float, bool, type(None), complex)
_MARKERS = frozenset({DaskRemoteValue, UpstreamRef})


def _swap(obj: Any, owner: _DaskBase) -> Any:
    """``obj`` with this backend's remote values replaced by their Dask futures
    (Dask finds futures nested in lists, tuples, sets and dicts)."""

    def native(marker: Any) -> Any:
        if type(marker) is DaskRemoteValue:
            return marker.handle if marker.owner is owner else marker
        tracked = owner._tasks.get(marker.uid)
        if tracked is None:
            raise UpstreamGone(marker.uid)
        return tracked.future

    for inner in find(obj, frozenset):
        if contains(tuple(inner), _MARKERS):
            raise TaskDefinitionError(
                "Dask does not look inside a frozenset for the results it must "
                "pass; put them in a tuple, list or set instead"
            )
    return replace(obj, _MARKERS, native)


def _refs(obj: Any, out: set[str]) -> None:
    out.update(ref.uid for ref in find(obj, UpstreamRef))


def _has_remote(obj: Any) -> bool:
    return contains(obj, _MARKERS)


def _payload(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    n = 0
    for a in args:
        n += _size(a)
    if kwargs:
        for v in kwargs.values():
            n += _size(v)
    return n


def _size(obj: Any) -> int:
    t = type(obj)
    if t in _SMALL:
        return 32
    if t is str or t is bytes:
        return len(obj)
    if t is DaskRemoteValue or t is UpstreamRef:
        return 64
    return int(sizeof(obj))
