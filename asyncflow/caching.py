"""The engine's side of the result store: key, look up, record.

Everything happens in the driver, on the event loop, before submission: a hit
never reaches a backend, so the store behaves the same on every backend.  A
task is keyed when it becomes ready (:mod:`asyncflow.keys`), from its original
arguments, in which upstream futures stand for their own keys.  Function tasks
are looked up then; executable tasks once their body has built the command.

A piped task (one handed to its runtime before its upstream finished) is keyed,
so that its result is stored, but not looked up: its upstream is still running,
so this run did not find that upstream in the store either.

A value a backend left in its runtime (a ``RemoteValue``) is fetched as soon as
its task ends, and stored once it is in the driver.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from .data import OutputFile
from .keys import command_key, function_key, output_digests, outputs_unchanged
from .protocol import RemoteValue
from .store import MISS, ResultStore
from .tasks import TaskKind
from .walk import find

if TYPE_CHECKING:
    from .future import TaskFuture
    from .spec import Command

__all__ = ["Caching"]

log = logging.getLogger("asyncflow.store")

_EXEC = "asyncflow-command-result"


class Caching:
    """One engine's store, and what this run found in it."""

    def __init__(self, store: ResultStore, refresh: bool = False):
        self.store = store
        self.refresh = refresh  # look nothing up, store everything again
        self.hits = 0
        self.stored = 0
        #: uid -> the output files an executable declared, hashed once it succeeds
        self._outputs: dict[str, tuple[tuple[Any, ...], dict[str, Any]]] = {}

    def key_function(self, fut: TaskFuture, piped: bool) -> Any:
        """Key a ready function task; its stored value, or :data:`MISS`."""
        decl = fut._decl
        if decl.kind is not TaskKind.FUNCTION or not decl.opts.cache:
            return MISS
        key = function_key(decl.fn, decl.opts.version, fut._args, fut._kwargs)
        fut._cache_key = key
        if key is None or piped or self.refresh:
            return MISS
        return self._hit(key)

    def key_command(
        self,
        fut: TaskFuture,
        command: Command,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        """Key an executable task's command; its stored stdout, or :data:`MISS`.

        A stored command counts only if the output files it declared are still
        there, unchanged."""
        decl = fut._decl
        if not decl.opts.cache:
            return MISS
        key = command_key(decl.fn, decl.opts.version, command, args, kwargs)
        fut._cache_key = key
        if key is None:
            return MISS
        if find((args, kwargs), OutputFile):
            self._outputs[fut.uid] = (args, kwargs)
        if self.refresh:
            return MISS
        found = self.store.get(key)
        if (
            type(found) is tuple
            and len(found) == 3
            and found[0] == _EXEC
            and outputs_unchanged(found[2])
        ):
            self.hits += 1
            return found[1]
        return MISS

    def _hit(self, key: str) -> Any:
        found = self.store.get(key)
        if found is not MISS:
            self.hits += 1
        return found

    def record(self, fut: TaskFuture, value: Any) -> None:
        """Store a success (called only for successes)."""
        key = fut._cache_key
        if key is None or isinstance(value, RemoteValue):
            return
        if fut._decl.kind is TaskKind.EXECUTABLE:
            declared = self._outputs.pop(fut.uid, None)
            outputs = output_digests(*declared) if declared else {}
            value = (_EXEC, value, outputs)
        try:
            stored = self.store.put(key, fut.name, value)
        except Exception:  # a full disk must not fail a task that succeeded
            log.warning("could not store the result of %s", fut.uid, exc_info=True)
            return
        self.stored += stored

    def forget(self, fut: TaskFuture) -> None:
        self._outputs.pop(fut.uid, None)
