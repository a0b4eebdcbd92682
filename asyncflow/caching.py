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

A task looked up and not found is claimed first (:mod:`asyncflow.claims`), so
that a second driver sharing the store waits for its result rather than
computing it too; a task another driver has claimed waits (:meth:`Caching.wait`)
and is then made ready again, to find the result or claim the key itself.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .claims import TTL, ClaimResult, new_owner
from .data import OutputFile
from .future import FINAL
from .keys import command_key, function_key, output_digests, outputs_unchanged
from .protocol import RemoteValue
from .store import MISS, ResultStore
from .tasks import TaskKind
from .walk import find

if TYPE_CHECKING:
    from .future import TaskFuture
    from .spec import Command

__all__ = ["WAIT", "Caching"]

#: what a lookup returns for a key another driver is computing
WAIT: Any = object()

Again = Callable[["TaskFuture"], None]

log = logging.getLogger("asyncflow.store")

_EXEC = "asyncflow-command-result"


class Caching:
    """One engine's store, and what this run found in it."""

    def __init__(self, store: ResultStore, refresh: bool = False):
        self.store = store
        self.refresh = refresh  # look nothing up, store everything again
        self.hits = 0
        self.stored = 0
        self.claims = store.claims(new_owner())
        self._renewal: asyncio.TimerHandle | None = None
        #: written once per turn of the loop: keys to claim, results to store
        self._to_claim: list[tuple[TaskFuture, str, Again]] = []
        self._to_store: list[tuple[str, str, Any]] = []
        #: uids whose key this driver claimed: run them without a new lookup
        self._granted: set[str] = set()
        #: uid -> the output files an executable declared, hashed once it succeeds
        self._outputs: dict[str, tuple[tuple[Any, ...], dict[str, Any]]] = {}

    def key_function(self, fut: TaskFuture, piped: bool, again: Again) -> Any:
        """Key a ready function task; its stored value, :data:`MISS` (run it),
        or :data:`WAIT` (another driver runs it: ``again(fut)`` follows once it
        is stored or abandoned)."""
        decl = fut._decl
        if decl.kind is not TaskKind.FUNCTION or not decl.opts.cache:
            return MISS
        if fut.uid in self._granted:
            self._granted.discard(fut.uid)
            return MISS
        key = function_key(decl.fn, decl.opts.version, fut._args, fut._kwargs)
        fut._cache_key = key
        if key is None or piped or self.refresh:
            return MISS
        return self._hit(fut, key, again)

    def key_command(
        self,
        fut: TaskFuture,
        command: Command,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        again: Again,
    ) -> Any:
        """Key an executable task's command; its stored stdout, :data:`MISS`
        or :data:`WAIT`.

        A stored command counts only if the output files it declared are still
        there, unchanged; otherwise its entry is dropped and it runs again."""
        decl = fut._decl
        if not decl.opts.cache:
            return MISS
        if fut.uid in self._granted:
            self._granted.discard(fut.uid)
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
        if found is not MISS:
            if (
                type(found) is tuple
                and len(found) == 3
                and found[0] == _EXEC
                and outputs_unchanged(found[2])
            ):
                self.hits += 1
                return found[1]
            self.store.delete([key])
        return self._claim(fut, key, again)

    def _hit(self, fut: TaskFuture, key: str, again: Again) -> Any:
        found = self.store.get(key)
        if found is not MISS:
            self.hits += 1
            return found
        return self._claim(fut, key, again)

    def _claim(self, fut: TaskFuture, key: str, again: Again) -> Any:
        """Queue ``key`` to be claimed with the others missed in this turn of
        the loop; :data:`WAIT` until then."""
        self._to_claim.append((fut, key, again))
        if len(self._to_claim) == 1:
            asyncio.get_running_loop().call_soon(self._claim_queued)
        return WAIT

    def _claim_queued(self) -> None:
        """Claim the queued keys in one transaction: run the tasks whose key
        this driver got (``again``, which finds it granted), and make the
        others wait for the driver holding theirs (or look up what it stored)."""
        queued, self._to_claim = self._to_claim, []
        found = self.claims.claim_many([key for _, key, _ in queued])
        for (fut, key, again), result in zip(queued, found, strict=True):
            if fut._tstate in FINAL:  # cancelled while queued
                if result is ClaimResult.MINE:
                    self.claims.release(key)
            elif result is ClaimResult.MINE:
                self._granted.add(fut.uid)
                again(fut)
            else:
                fut._job = asyncio.ensure_future(self._wait(fut, again))
        if self._renewal is None and queued:
            self._renew()

    def _renew(self) -> None:
        """Keep this driver's claims alive while it runs (see asyncflow.claims)."""
        self.claims.renew()
        loop = asyncio.get_running_loop()
        self._renewal = loop.call_later(TTL / 3, self._renew)

    async def _wait(self, fut: TaskFuture, again: Again) -> None:
        """Wait while another driver holds ``fut``'s key, then look it up again
        (``again``): it is stored, or free for this driver to claim."""
        key, delay = fut._cache_key, 0.05
        assert key is not None
        while self.claims.held(key):
            await asyncio.sleep(delay)
            delay = min(1.0, delay * 2)
        fut._job = None
        again(fut)

    def record(self, fut: TaskFuture, value: Any) -> None:
        """Store a success (called only for successes)."""
        key = fut._cache_key
        if key is None or isinstance(value, RemoteValue):
            return
        if fut._decl.kind is TaskKind.EXECUTABLE:
            declared = self._outputs.pop(fut.uid, None)
            outputs = output_digests(*declared) if declared else {}
            value = (_EXEC, value, outputs)
        self._to_store.append((key, fut.name, value))
        if len(self._to_store) == 1:
            asyncio.get_running_loop().call_soon(self._store_queued)

    def _store_queued(self) -> None:
        """Store the results of this turn of the loop in one transaction."""
        queued, self._to_store = self._to_store, []
        if not queued:
            return
        try:
            missed = self.store.put_many(queued)
        except Exception:  # a full disk must not fail tasks that succeeded
            log.warning("could not store %d results", len(queued), exc_info=True)
            missed = [key for key, _, _ in queued]
        self.stored += len(queued) - len(missed)
        for key in missed:
            self.claims.release(key)

    def forget(self, fut: TaskFuture) -> None:
        """``fut`` ended without a result: another driver may compute it now."""
        self._outputs.pop(fut.uid, None)
        if fut._cache_key is not None:
            self.claims.release(fut._cache_key)

    def close(self) -> None:
        """Write what is queued, and give up this driver's claims."""
        self._store_queued()
        self._claim_queued()
        if self._renewal is not None:
            self._renewal.cancel()
            self._renewal = None
        self.claims.release_all()
