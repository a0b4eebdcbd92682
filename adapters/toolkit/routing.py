"""Which tasks of a batch travel in chunks, and which keep the runtime's path.

A distributed runtime's adapter keeps its own path for what chunks cannot
carry (``resources=``, runtime options, values the runtime holds) and for
batches too small to gain from them, and sends the rest through its
:class:`~.chunks.ChunkQueue`.  Piped specs follow their upstreams: all of them
chunked, the spec is chunked too; split between the paths, it is refused (the
engine sends it again with the values).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from ...protocol import UpstreamRef
from ...spec import TaskSpec
from ...walk import find
from .chunks import ChunkQueue

__all__ = ["MIN_BURST", "plain_call", "route"]

#: calls of one function in one batch from which a distributed runtime's
#: adapter sends them in chunks (and at least two per worker slot, so that a
#: batch too small to fill the workers twice keeps the runtime's own path)
MIN_BURST = 16


def route(
    queue: ChunkQueue,
    specs: Sequence[TaskSpec],
    burst: int,
    eligible: Callable[[TaskSpec], bool],
    native_pipes: bool = True,
) -> tuple[list[TaskSpec], list[str]]:
    """Queue, in ``queue``, the specs of ``specs`` that go in chunks: every ``eligible``
    one whose function is called at least ``burst`` times in the batch,
    and every piped one whose upstreams are all here.  Returns the rest,
    for the runtime's own path, and the uids of piped specs whose
    upstreams are split between the two paths, or, where the runtime's
    path cannot pipe (``native_pipes=False``), not all here (refused: see
    the protocol)."""
    # eligibility and keys once per spec: an adapter's test may walk arguments
    calls = [(s, eligible(s)) for s in specs]
    keys = [_function_key(s) if ok else None for s, ok in calls]
    counts = Counter(k for k in keys if k is not None)
    if queue.large:  # functions that return large values keep the runtime's path
        for i, (spec, ok) in enumerate(calls):
            if ok and queue.returns_large(spec):
                keys[i] = None
    live = queue.pipes.live  # not copied: a batch's own chunked uids go in taken
    taken: set[str] = set()
    buckets: tuple[list[TaskSpec], list[TaskSpec], list[TaskSpec]] = ([], [], [])
    for (spec, ok), key in zip(calls, keys, strict=True):
        many = key is not None and counts[key] >= burst
        where = _bucket(spec, ok, many, (live, taken), native_pipes)
        buckets[where].append(spec)
        if where == _CHUNK:
            taken.add(spec.uid)
    chunked, rest, refused = buckets
    refused_uids = [s.uid for s in refused]
    if chunked:
        refused_uids += queue.put(chunked)
    return rest, refused_uids


def plain_call(spec: TaskSpec, runtime: str) -> bool:
    """A function task a chunk may carry: not kept out of chunks, no
    ``resources=``, no options for ``runtime``."""
    return (
        spec.function is not None
        and spec.chunk
        and spec.resources.is_default
        and not (spec.options and spec.options.get(runtime))
    )


_CHUNK, _REST, _REFUSE = range(3)


def _bucket(
    spec: TaskSpec,
    ok: bool,
    many: bool,
    here: tuple[set[str], set[str]],
    native_pipes: bool,
) -> int:
    """Where one spec of a batch goes: ``ok`` is its eligibility, ``many``
    whether its function is called often enough, ``here`` the uids in the
    queue and those this batch put there."""
    ups = _upstreams(spec) if spec.has_remote_args else set()
    live, taken = here
    found = sum(1 for u in ups if u in live or u in taken)
    if found or (ups and not native_pipes):
        return _CHUNK if ok and found == len(ups) else _REFUSE
    return _CHUNK if many and not ups else _REST


def _function_key(spec: TaskSpec) -> Any:
    try:
        hash(spec.function)
    except TypeError:  # an unhashable callable object
        return id(spec.function)
    return spec.function


_REFS = frozenset({UpstreamRef})


def _upstreams(spec: TaskSpec) -> set[str]:
    return {ref.uid for ref in find((spec.args, spec.kwargs), _REFS)}
