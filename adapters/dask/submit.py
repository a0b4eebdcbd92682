"""Submission: each loop turn's ready tasks as few ``client.map`` calls as can be.

Tasks that share a function kind, resources and options go out as one
``client.map`` (one ``update-graph`` message, kept under ``BATCH_BYTES``).
Tasks naming other tasks' results are swapped onto Dask futures in the engine's
order; big arguments are scattered to the workers first; resource requests the
cached worker list cannot meet wait for one refresh.  Each submitted future gets
a watcher (see ``results``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from distributed import Client

from ...errors import (
    EngineClosedError,
    ResourceUnavailableError,
    SerializationError,
    TaskDefinitionError,
    UpstreamGone,
)
from ...spec import TaskSpec
from ...worker import dumps_function
from .base import _Tracked
from .errors import _is_pickling_error, _lost_error
from .resources import _ResourcesMixin, _Unknown
from .results import _ResultsMixin
from .values import MB, DaskRemoteValue, _has_remote, _payload, _refs, _size, _swap
from .worker import _run_command, _run_function

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


class _SubmitMixin(_ResourcesMixin, _ResultsMixin):
    """``submit`` and everything between a spec and a watched Dask future."""

    # -- protocol: submit ----------------------------------------------------------
    def submit(self, specs: Sequence[TaskSpec]) -> None:
        sink = self._sink
        assert sink is not None
        if self._closed or self._client is None:
            for spec in specs:
                sink.set_exception(
                    spec.uid,
                    EngineClosedError(
                        f"task {spec.name!r}: the Dask backend is shut down"
                    ),
                )
            return
        groups: dict[tuple[Any, ...], tuple[Any, list[_Item]]] = {}
        recheck: list[TaskSpec] = []
        scatter: list[TaskSpec] = []
        piped: list[tuple[TaskSpec, dict[str, float] | None]] = []
        for spec in specs:
            if spec.has_remote_args:
                _refs(spec.args, self._consumed)
                _refs(spec.kwargs, self._consumed)
        for spec in specs:
            resources = None
            if not spec.resources.is_default:
                try:
                    resources = self._dask_resources(spec)
                except _Unknown:
                    recheck.append(spec)
                    continue
                except ResourceUnavailableError as exc:
                    sink.set_exception(spec.uid, exc)
                    continue
            if (
                spec.command is None
                and (spec.args or spec.kwargs)
                and _payload(spec.args, spec.kwargs) > SCATTER_BYTES
            ):
                scatter.append(spec)
                continue
            if spec.has_remote_args:
                piped.append((spec, resources))
                continue
            self._add(groups, spec, resources)
        self._map_groups(groups)
        if piped:
            self._submit_piped(piped)
        self._consumed.clear()
        if recheck:
            self._deferred.update(spec.uid for spec in recheck)
            self._spawn(self._recheck(recheck))
        if scatter:
            self._deferred.update(spec.uid for spec in scatter)
            self._spawn(self._submit_scattered(scatter))

    def _submit_piped(
        self, items: list[tuple[TaskSpec, dict[str, float] | None]]
    ) -> None:
        """Specs naming other tasks' results, in the engine's (topological)
        order.  Independent ones still share a ``client.map``; one naming a
        task of the group being built flushes that group first, so the Dask
        future it needs exists."""
        groups: dict[tuple[Any, ...], tuple[Any, list[_Item]]] = {}
        queued: set[str] = set()
        for spec, resources in items:
            try:
                native = (_swap(spec.args, self), _swap(spec.kwargs, self))
            except TaskDefinitionError as exc:
                bad = TaskDefinitionError(f"task {spec.name!r}: {exc}")
                self._sink.set_exception(spec.uid, bad)  # type: ignore[union-attr]
                continue
            except UpstreamGone as exc:
                if exc.uid not in queued:
                    self._sink.set_exception(spec.uid, exc)  # type: ignore[union-attr]
                    continue
                self._map_groups(groups)
                groups = {}
                queued.clear()
                try:
                    native = (_swap(spec.args, self), _swap(spec.kwargs, self))
                except UpstreamGone as exc:  # the upstream was rejected
                    self._sink.set_exception(spec.uid, exc)  # type: ignore[union-attr]
                    continue
            self._add(groups, spec, resources, native)
            queued.add(spec.uid)
        self._map_groups(groups)

    def _add(
        self,
        groups: dict[tuple[Any, ...], tuple[Any, list[_Item]]],
        spec: TaskSpec,
        resources: dict[str, float] | None,
        native: tuple[tuple[Any, ...], dict[str, Any]] | None = None,
    ) -> None:
        """File ``spec`` with the others that can share one ``client.map``."""
        key = f"{spec.name}-{self._token}-{spec.uid}"
        # A result consumed by a task in the same batch stays on the workers:
        # pushing it to the driver too costs a scheduler message per hop.
        topic = None if spec.uid in self._consumed else self._topic
        if spec.command is not None:
            fn: Callable[..., Any] = _run_command
            args: tuple[Any, ...] = (topic, key, spec.command, spec.uid, spec.name)
        else:
            try:
                blob = self._pickle(spec)
            except SerializationError as exc:
                self._sink.set_exception(spec.uid, exc)  # type: ignore[union-attr]
                return
            a, kw = native or (spec.args, spec.kwargs)
            if spec.has_remote_args and native is None:
                try:
                    a, kw = _swap(a, self), _swap(kw, self)
                except (UpstreamGone, TaskDefinitionError) as exc:
                    self._sink.set_exception(spec.uid, exc)  # type: ignore[union-attr]
                    return
            fn = _run_function
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

    def _map_groups(
        self, groups: dict[tuple[Any, ...], tuple[Any, list[_Item]]]
    ) -> None:
        for (fn, _, _), (resources, items) in groups.items():
            options = {
                k: v for k, v in items[0][0].options.items() if k in SUBMIT_OPTIONS
            }
            # Keep each update-graph message small enough for Dask not to warn.
            chunk: list[_Item] = []
            size = 0
            for item in items:
                spec = item[0]
                n = 0 if spec.command is not None else _payload(spec.args, spec.kwargs)
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
        client = self._client
        assert client is not None and self._loop is not None
        if self._dead is not None:  # no worker will ever come: say why now
            for spec, _ in chunk:
                err = _lost_error(spec.name, self._dead)
                self._sink.set_exception(spec.uid, err)  # type: ignore[union-attr]
            return
        keys = [args[1] for _, args in chunk]
        columns = list(zip(*(args for _, args in chunk), strict=True))
        try:
            futures = client.map(
                fn,
                *columns,
                key=keys,
                pure=False,
                resources=resources,
                **options,
            )
        except Exception as exc:
            if len(chunk) > 1:  # find the culprit: one at a time
                for item in chunk:
                    self._map(fn, resources, options, [item])
            else:
                self._reject(chunk[0][0], exc)
            return
        create_task = self._loop.create_task
        for (spec, _), fut, key in zip(chunk, futures, keys, strict=True):
            watcher = create_task(self._watch(spec.uid, spec.name, fut))
            self._tasks[spec.uid] = _Tracked(
                fut, key, spec.command is not None, watcher, spec.name
            )
            self._keys.add(key)

    def _reject(self, spec: TaskSpec, exc: Exception) -> None:
        sink = self._sink
        assert sink is not None
        err: BaseException = exc
        if _is_pickling_error(exc):
            err = SerializationError(
                f"task {spec.name!r}: an argument cannot be serialised for Dask "
                f"({type(exc).__name__}: {exc}); pass plain data, or define its "
                "types at module level"
            )
            err.__cause__ = exc
        sink.set_exception(spec.uid, err)

    def _pickle(self, spec: TaskSpec) -> bytes:
        fn = spec.function
        try:
            return self._pickled[fn]
        except KeyError:
            pass
        except TypeError:  # unhashable callable object
            return _dumps(spec)
        blob = self._pickled[fn] = _dumps(spec)
        return blob

    async def _recheck(self, specs: list[TaskSpec]) -> None:
        """Refresh the worker list once, then submit or reject ``specs``."""
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.ensure_future(self._refresh_workers())
        with contextlib.suppress(Exception):
            await asyncio.shield(self._refreshing)
        sink = self._sink
        assert sink is not None
        groups: dict[tuple[Any, ...], tuple[Any, list[_Item]]] = {}
        for spec in specs:
            if spec.uid not in self._deferred or self._closed:
                continue  # cancelled meanwhile
            self._deferred.discard(spec.uid)
            try:
                resources = self._dask_resources(spec, final=True)
            except ResourceUnavailableError as exc:
                sink.set_exception(spec.uid, exc)
                continue
            if (
                spec.command is None
                and _payload(spec.args, spec.kwargs) > SCATTER_BYTES
            ):
                self._deferred.add(spec.uid)
                self._spawn(self._submit_scattered([spec]))
                continue
            self._add(groups, spec, resources)
        self._map_groups(groups)

    # -- large arguments -----------------------------------------------------------
    async def _submit_scattered(self, specs: list[TaskSpec]) -> None:
        """Send big arguments straight to the workers, then submit the tasks."""
        client = self._client
        assert client is not None
        for spec in specs:
            if spec.uid not in self._deferred:
                continue
            try:
                moved = await self._scatter_args(client, spec)
            except Exception as exc:
                if spec.uid in self._deferred:
                    self._deferred.discard(spec.uid)
                    self._reject(spec, exc)
                continue
            if spec.uid not in self._deferred or self._closed:
                continue  # cancelled meanwhile
            self._deferred.discard(spec.uid)
            resources = (
                None
                if spec.resources.is_default
                else self._dask_resources(spec, final=True)
            )
            groups: dict[tuple[Any, ...], tuple[Any, list[_Item]]] = {}
            self._add(groups, moved, resources)
            self._map_groups(groups)

    async def _scatter_args(self, client: Client, spec: TaskSpec) -> TaskSpec:
        big: list[Any] = []
        slots: list[tuple[bool, Any]] = []
        for i, a in enumerate(spec.args):
            if not _has_remote(a) and _size(a) > SCATTER_EACH:
                slots.append((True, i))
                big.append(a)
        for k, v in spec.kwargs.items():
            if not _has_remote(v) and _size(v) > SCATTER_EACH:
                slots.append((False, k))
                big.append(v)
        futures = await client.scatter(big, hash=False) if big else []
        args = list(spec.args)
        kwargs = dict(spec.kwargs)
        for (positional, at), fut in zip(slots, futures, strict=True):
            if positional:
                args[at] = DaskRemoteValue(self, fut)
            else:
                kwargs[at] = DaskRemoteValue(self, fut)
        return replace(spec, args=tuple(args), kwargs=kwargs, has_remote_args=True)


def _dumps(spec: TaskSpec) -> bytes:
    try:
        assert spec.function is not None
        return dumps_function(spec.function)
    except Exception as exc:
        raise SerializationError(
            f"task {spec.name!r}: its function cannot be serialised for Dask "
            f"({type(exc).__name__}: {exc}); define it at module level and do not "
            "capture locks, sockets or open files"
        ) from exc
