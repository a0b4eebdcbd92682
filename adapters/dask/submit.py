"""Submission: each loop turn's ready tasks as few ``client.map`` calls as can be.

Tasks that share a function kind, resources and options go out as one
``client.map`` (one ``update-graph`` message, kept under ``BATCH_BYTES``).
Tasks naming other tasks' results are swapped onto Dask futures in the engine's
order, and one naming a task this adapter no longer tracks is refused (the
engine sends it again with the value); big arguments are scattered to the
workers first; resource requests the cached worker list cannot meet wait for one
refresh.  A task held back for either is pinned to its upstreams' Dask futures
at once, so the wait cannot lose them.  Each submitted future gets a watcher
(see ``results``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from distributed import Client

from ...errors import (
    EngineClosedError,
    ResourceUnavailableError,
    SerializationError,
)
from ...protocol import UpstreamRef
from ...spec import TaskSpec
from ...walk import replace as swap
from ..toolkit import FunctionCache, lost_error
from .errors import submit_error
from .resources import ResourceChecker, StaleWorkers
from .results import Completions
from .state import DaskState, Tracked
from .values import (
    MB,
    DaskRemoteValue,
    dask_args,
    has_remote,
    payload,
    size_of,
    upstream_uids,
)
from .worker import run_command_task, run_function, run_thawed_function

# A task whose arguments add up to more than SCATTER_BYTES has each argument over
# SCATTER_EACH scattered to a worker first, instead of riding in the task graph
# (Dask warns about graphs over 10 MB, and routes them through the scheduler).
# One update-graph message is kept under BATCH_BYTES.
SCATTER_BYTES = 1 * MB
SCATTER_EACH = 64 * 1024
BATCH_BYTES = 4 * MB
# ``options=`` keys passed through to ``client.map``.
SUBMIT_OPTIONS = ("workers", "allow_other_workers", "priority")

_Item = tuple[TaskSpec, tuple[Any, ...]]  # a spec and its worker-call arguments
#: specs that can share one ``client.map``, by (function, resources, options)
_Groups = dict[tuple[Any, ...], tuple[Any, list[_Item]]]
#: a spec's arguments with Dask futures in, and whether the worker must thaw them
_Native = tuple[tuple[Any, ...], dict[str, Any], bool]
_REFS = frozenset({UpstreamRef})


class _Gone(Exception):
    """A piped spec names an upstream this adapter no longer tracks."""


class Submitter:
    """Everything between a spec and a watched Dask future."""

    def __init__(
        self, state: DaskState, resources: ResourceChecker, completions: Completions
    ):
        self._state = state
        self._resources = resources
        self._completions = completions
        self.functions = FunctionCache("Dask")
        self._consumed: set[str] = set()  # uids a spec of this batch takes in

    def submit(self, specs: Sequence[TaskSpec]) -> list[str]:
        """Send ``specs``; the uids of piped ones whose upstream is gone."""
        state = self._state
        sink = state.sink
        assert sink is not None
        if state.life.closed or state.client is None:
            for spec in specs:
                sink.set_exception(
                    spec.uid,
                    EngineClosedError(
                        f"task {spec.name!r}: the Dask backend is shut down"
                    ),
                )
            return []
        groups: _Groups = {}
        recheck: list[TaskSpec] = []
        scatter: list[TaskSpec] = []
        piped: list[tuple[TaskSpec, dict[str, float] | None]] = []
        for spec in specs:
            if spec.has_remote_args:
                upstream_uids(spec.args, self._consumed)
                upstream_uids(spec.kwargs, self._consumed)
        for spec in specs:
            try:
                resources = self._check(spec)
            except StaleWorkers:
                recheck.append(spec)
                continue
            except ResourceUnavailableError as exc:
                sink.set_exception(spec.uid, exc)
                continue
            if _too_big(spec):
                scatter.append(spec)
            elif spec.has_remote_args:
                piped.append((spec, resources))
            else:
                self._add(groups, spec, resources)
        self._map_groups(groups)
        refused = self._submit_piped(piped) if piped else []
        self._consumed.clear()
        if recheck:
            recheck = self._pin_all(recheck, refused)
            state.deferred.update(spec.uid for spec in recheck)
            state.life.spawn(self._recheck(recheck))
        if scatter:
            scatter = self._pin_all(scatter, refused)
            state.deferred.update(spec.uid for spec in scatter)
            state.life.spawn(self._submit_scattered(scatter))
        return refused

    def _pin_all(self, specs: list[TaskSpec], refused: list[str]) -> list[TaskSpec]:
        """``specs`` with their running upstreams held as Dask futures (see the
        module's doc); one whose upstream is gone goes to ``refused``."""
        pinned = []
        for spec in specs:
            if not spec.has_remote_args:
                pinned.append(spec)
                continue
            try:
                args = swap(spec.args, _REFS, self._pin)
                kwargs = swap(spec.kwargs, _REFS, self._pin)
            except _Gone:
                refused.append(spec.uid)
                continue
            pinned.append(replace(spec, args=args, kwargs=kwargs))
        return pinned

    def _pin(self, ref: UpstreamRef) -> DaskRemoteValue:
        tracked = self._state.tasks.get(ref.uid)
        if tracked is None:
            raise _Gone(ref.uid)
        return DaskRemoteValue(
            self._state.owner, tracked.future, self._completions.fetch
        )

    def _check(self, spec: TaskSpec, final: bool = False) -> dict[str, float] | None:
        if spec.resources.is_default:
            return None
        return self._resources.dask_resources(spec, final)

    def _native(self, marker: Any) -> Any:
        """The Dask counterpart of a remote value or a running upstream."""
        if type(marker) is DaskRemoteValue:
            return marker.handle if marker.owner is self._state.owner else marker
        tracked = self._state.tasks.get(marker.uid)
        if tracked is None:
            raise _Gone(marker.uid)
        return tracked.future

    def _submit_piped(
        self, items: list[tuple[TaskSpec, dict[str, float] | None]]
    ) -> list[str]:
        """Specs naming other tasks' results, in the engine's (topological)
        order.  Independent ones still share a ``client.map``; one naming a
        task of the group being built flushes that group first, so the Dask
        future it needs exists.  Returns the uids of those refused."""
        refused: list[str] = []
        groups: _Groups = {}
        queued: set[str] = set()
        for spec, resources in items:
            try:
                native = dask_args(spec, self._native)
            except _Gone as exc:
                if exc.args[0] not in queued:
                    refused.append(spec.uid)
                    continue
                self._map_groups(groups)
                groups = {}
                queued.clear()
                try:
                    native = dask_args(spec, self._native)
                except _Gone:  # the upstream was rejected
                    refused.append(spec.uid)
                    continue
            self._add(groups, spec, resources, native)
            queued.add(spec.uid)
        self._map_groups(groups)
        return refused

    def _add(
        self,
        groups: _Groups,
        spec: TaskSpec,
        resources: dict[str, float] | None,
        native: _Native | None = None,
    ) -> None:
        """File ``spec`` with the others that can share one ``client.map``."""
        key = f"{spec.name}-{self._state.token}-{spec.uid}"
        # A result consumed by a task in the same batch stays on the workers:
        # pushing it to the driver too costs a scheduler message per hop.
        topic = None if spec.uid in self._consumed else self._state.topic
        if spec.command is not None:
            fn: Callable[..., Any] = run_command_task
            args: tuple[Any, ...] = (topic, key, spec.command, spec.uid, spec.name)
        else:
            call = self._function_call(spec, native)
            if call is None:
                return
            fn, (blob, a, kw) = call
            args = (topic, key, blob, a, kw, spec.is_async, spec.name)
        options = spec.options
        opts = (
            tuple((k, repr(options[k])) for k in SUBMIT_OPTIONS if k in options)
            if options
            else ()
        )
        gkey = (fn, tuple(sorted(resources.items())) if resources else None, opts)
        group = groups.get(gkey)
        if group is None:
            groups[gkey] = (resources, [(spec, args)])
        else:
            group[1].append((spec, args))

    def _function_call(
        self, spec: TaskSpec, native: _Native | None
    ) -> tuple[Callable[..., Any], tuple[bytes, Any, Any]] | None:
        """The worker function and (blob, args, kwargs) for a function task;
        None once ``spec`` has failed."""
        sink = self._state.sink
        assert sink is not None
        try:
            blob = self.functions.blob(spec)
        except SerializationError as exc:
            sink.set_exception(spec.uid, exc)
            return None
        if native is None and spec.has_remote_args:  # pinned: see _pin_all
            native = dask_args(spec, self._native)
        a, kw, thawed = native or (spec.args, spec.kwargs, False)
        return (run_thawed_function if thawed else run_function), (blob, a, kw)

    def _map_groups(self, groups: _Groups) -> None:
        for (fn, _, _), (resources, items) in groups.items():
            options = {
                k: v for k, v in items[0][0].options.items() if k in SUBMIT_OPTIONS
            }
            # Keep each update-graph message small enough for Dask not to warn.
            chunk: list[_Item] = []
            size = 0
            for item in items:
                spec = item[0]
                n = 0 if spec.command is not None else payload(spec.args, spec.kwargs)
                if chunk and size + n > BATCH_BYTES:
                    self._map(fn, resources, options, chunk)
                    chunk, size = [], 0
                chunk.append(item)
                size += n
            if chunk:
                self._map(fn, resources, options, chunk)

    def _map(
        self,
        fn: Callable[..., Any],
        resources: dict[str, float] | None,
        options: dict[str, Any],
        chunk: list[_Item],
    ) -> None:
        state = self._state
        client, sink, loop = state.client, state.sink, state.life.loop
        assert client is not None and sink is not None and loop is not None
        if state.dead is not None:  # no worker will ever come: say why now
            for spec, _ in chunk:
                sink.set_exception(spec.uid, lost_error(spec.name, state.dead))
            return
        keys = [args[1] for _, args in chunk]
        columns = list(zip(*(args for _, args in chunk), strict=True))
        try:
            futures = client.map(
                fn, *columns, key=keys, pure=False, resources=resources, **options
            )
        except Exception as exc:
            if len(chunk) > 1:  # find the culprit: one at a time
                for item in chunk:
                    self._map(fn, resources, options, [item])
            else:
                spec = chunk[0][0]
                sink.set_exception(spec.uid, submit_error(spec.name, exc))
            return
        watch = self._completions.watch
        for (spec, _), fut, key in zip(chunk, futures, keys, strict=True):
            watcher = loop.create_task(watch(spec.uid, spec.name, fut))
            state.tasks[spec.uid] = Tracked(
                fut, key, spec.command is not None, watcher, spec.name
            )
            state.keys.add(key)

    async def _recheck(self, specs: list[TaskSpec]) -> None:
        """Refresh the worker list once, then submit or reject ``specs``."""
        await self._resources.refresh_shared()
        state = self._state
        sink = state.sink
        assert sink is not None
        groups: _Groups = {}
        for spec in specs:
            if spec.uid not in state.deferred or state.life.closed:
                continue  # cancelled meanwhile
            state.deferred.discard(spec.uid)
            try:
                resources = self._check(spec, final=True)
            except ResourceUnavailableError as exc:
                sink.set_exception(spec.uid, exc)
                continue
            if _too_big(spec):
                state.deferred.add(spec.uid)
                state.life.spawn(self._submit_scattered([spec]))
                continue
            self._add(groups, spec, resources)
        self._map_groups(groups)

    # -- large arguments -----------------------------------------------------------
    async def _submit_scattered(self, specs: list[TaskSpec]) -> None:
        """Send big arguments straight to the workers, then submit the tasks."""
        state = self._state
        client, sink = state.client, state.sink
        assert client is not None and sink is not None
        for spec in specs:
            if spec.uid not in state.deferred:
                continue
            try:
                moved = await self._scatter_args(client, spec)
            except Exception as exc:
                if spec.uid in state.deferred:
                    state.deferred.discard(spec.uid)
                    sink.set_exception(spec.uid, submit_error(spec.name, exc))
                continue
            if spec.uid not in state.deferred or state.life.closed:
                continue  # cancelled meanwhile
            state.deferred.discard(spec.uid)
            groups: _Groups = {}
            self._add(groups, moved, self._check(spec, final=True))
            self._map_groups(groups)

    async def _scatter_args(self, client: Client, spec: TaskSpec) -> TaskSpec:
        big: list[Any] = []
        slots: list[tuple[bool, Any]] = []
        for i, a in enumerate(spec.args):
            if not has_remote(a) and size_of(a) > SCATTER_EACH:
                slots.append((True, i))
                big.append(a)
        for k, v in spec.kwargs.items():
            if not has_remote(v) and size_of(v) > SCATTER_EACH:
                slots.append((False, k))
                big.append(v)
        futures = await client.scatter(big, hash=False) if big else []
        args = list(spec.args)
        kwargs = dict(spec.kwargs)
        remote = self._completions.remote
        for (positional, at), fut in zip(slots, futures, strict=True):
            if positional:
                args[at] = remote(fut)
            else:
                kwargs[at] = remote(fut)
        return replace(spec, args=tuple(args), kwargs=kwargs, has_remote_args=True)


def _too_big(spec: TaskSpec) -> bool:
    """Whether ``spec``'s arguments should be scattered rather than sent."""
    return (
        spec.command is None
        and bool(spec.args or spec.kwargs)
        and payload(spec.args, spec.kwargs) > SCATTER_BYTES
    )
