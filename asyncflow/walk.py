"""The one walk over a task's arguments.

Futures, an adapter's remote values and references to running upstreams may sit
anywhere in a task's arguments, nested in the builtin containers: tuples,
lists, sets, frozensets and dict values.  Every part of asyncflow that looks for
them (the engine, the pipes, every adapter, code running in workers) walks with
these three functions, so all of them agree on what "nested" means: a value one
of them found and another missed would reach a task as a placeholder.

Markers are matched by exact type (``type(v) in kinds``): it is the fastest test,
and a marker class is never subclassed.  Other objects are left whole, even
containers of other types, as pickling them would also leave them whole.
Only this module imports nothing from asyncflow, so that workers import it
cheaply.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

__all__ = ["Kinds", "contains", "find", "replace"]

_SEQUENCES = (tuple, list, set, frozenset)


Kinds = type | tuple[type, ...] | frozenset[type]


def _kinds(kinds: Kinds) -> frozenset[type]:
    """A prepared frozenset passes through: hot callers build theirs once."""
    if isinstance(kinds, frozenset):
        return kinds
    return frozenset(kinds) if isinstance(kinds, tuple) else frozenset((kinds,))


def find(obj: Any, kinds: Kinds) -> list[Any]:
    """Every marker of ``kinds`` in ``obj``, depth first, repeats included."""
    wanted = _kinds(kinds)
    found: list[Any] = []
    stack: list[Iterable[Any]] = [(obj,)]
    while stack:
        for v in stack.pop():
            t = type(v)
            if t in wanted:
                found.append(v)
            elif t is dict:
                stack.append(v.values())
            elif t in _SEQUENCES:
                stack.append(v)
    return found


def contains(obj: Any, kinds: Kinds) -> bool:
    """Whether ``obj`` holds a marker of ``kinds`` anywhere."""
    wanted = _kinds(kinds)
    stack: list[Iterable[Any]] = [(obj,)]
    while stack:
        for v in stack.pop():
            t = type(v)
            if t in wanted:
                return True
            if t is dict:
                stack.append(v.values())
            elif t in _SEQUENCES:
                stack.append(v)
    return False


def replace(obj: Any, kinds: Kinds, value_of: Callable[[Any], Any]) -> Any:
    """A copy of ``obj`` with every marker of ``kinds`` replaced by
    ``value_of(marker)``; containers are rebuilt with their own type."""
    return _replace(obj, _kinds(kinds), value_of)


def _replace(obj: Any, wanted: frozenset[type], value_of: Callable[[Any], Any]) -> Any:
    t = type(obj)
    if t in wanted:
        return value_of(obj)
    if t is tuple or t is list or t is set or t is frozenset:
        return t(_replace(v, wanted, value_of) for v in obj)
    if t is dict:
        return {k: _replace(v, wanted, value_of) for k, v in obj.items()}
    return obj
