"""Submission: each spec becomes one ``.remote()`` call.

Functions are wrapped once per function (and per variant taking nested refs),
resource requests and ``options["ray"]`` become cached ``.options()`` variants,
and a request no node could meet fails at once instead of waiting forever.
Remote values and references to still-running tasks become ObjectRefs, nested
ones as extra top-level arguments.  Readiness callbacks are attached once the
whole batch is in (see ``results``).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import ray

from ...errors import (
    ResourceUnavailableError,
    SerializationError,
    TaskDefinitionError,
    WorkerLostError,
)
from ...output import DEFAULT
from ...protocol import ExecutionBackend, UpstreamRef
from ...spec import Resources, TaskSpec
from ...walk import replace
from .._pipes import collect
from .errors import submit_error
from .results import Completions, RayValue
from .state import RayState, RayTask
from .worker import EXEC, MARKER, NESTED, Slot, function_runner

__all__ = ["Submitter"]

#: what a spec's arguments may hold for this backend to swap
_MARKERS = frozenset({RayValue, UpstreamRef})

_OWN_OPTIONS = frozenset({"num_returns", "max_retries", "retry_exceptions"})

#: what a failed submission raises that already says what is wrong
_OURS = (
    ResourceUnavailableError,
    TaskDefinitionError,
    SerializationError,
)


class _Gone(Exception):
    """A piped spec names an upstream this adapter no longer tracks."""


class Submitter:
    """``submit`` and everything between a spec and a Ray ObjectRef.

    The remote wrappers are cached per function (``runners``, or ``by_id`` for
    an unhashable callable) and per resource request (``variants``) for the
    backend's lifetime: ``ray.remote`` and ``.options()`` each cost more than a
    small task's submission.  ``owner`` is the backend whose remote values and
    running tasks may be passed as arguments.
    """

    def __init__(
        self, state: RayState, owner: ExecutionBackend, completions: Completions
    ):
        self._state = state
        self._owner = owner
        self._completions = completions
        self.runners: dict[Any, Any] = {}
        self._by_id: dict[int, tuple[Any, Any]] = {}  # unhashable callables
        self._variants: dict[Any, Any] = {}

    def clear(self) -> None:
        self.runners.clear()
        self._by_id.clear()
        self._variants.clear()

    def submit(self, specs: Sequence[TaskSpec]) -> list[str]:
        """Send ``specs``; the uids of piped ones whose upstream is gone (the
        engine sends them again with the values)."""
        state = self._state
        sink = state.sink
        assert sink is not None
        submitted: list[tuple[str, ray.ObjectRef]] = []
        refused: list[str] = []
        for spec in specs:
            if state.lost is not None:
                sink.set_exception(
                    spec.uid, WorkerLostError(f"task {spec.name!r}: {state.lost}")
                )
                continue
            try:
                ref = self._call(spec)
            except _Gone:
                refused.append(spec.uid)
                continue
            except _OURS as exc:
                sink.set_exception(spec.uid, exc)
                continue
            except Exception as exc:
                if state.client and spec.function is not None:
                    self._forget_runner(spec.function)
                sink.set_exception(spec.uid, submit_error(spec, exc))
                continue
            upstreams: set[str] = set()
            if spec.has_remote_args:
                collect(spec.args, upstreams)
                collect(spec.kwargs, upstreams)
            state.tasks[spec.uid] = RayTask(
                spec.name, ref, spec.command is not None, frozenset(upstreams)
            )
            submitted.append((spec.uid, ref))
        # Callbacks only once the whole batch is in: while this loop holds the
        # GIL, a callback would stall the Ray thread that dispatches the tasks.
        self._on_completion(submitted)
        return refused

    def _call(self, spec: TaskSpec) -> ray.ObjectRef:
        """The ``.remote()`` call that runs ``spec``."""
        if spec.command is not None:
            remote = self._remote_for(spec, False)
            cmd = spec.command
            argv = cmd.argv if isinstance(cmd.argv, str) else list(cmd.argv)
            env = {**(cmd.env or {}), MARKER: f"{self._state.token}/{spec.uid}"}
            if cmd.capture == DEFAULT:
                return remote.remote(argv, env, cmd.cwd, spec.uid, spec.name)
            return remote.remote(argv, env, cmd.cwd, spec.uid, spec.name, cmd.capture)
        if spec.has_remote_args:
            args, kwargs = self._native_args(spec)
            remote = self._remote_for(spec, NESTED in kwargs)
            return remote.remote(*args, **kwargs)
        remote = self._remote_for(spec, False)
        return remote.remote(*spec.args, **spec.kwargs)

    def _on_completion(self, submitted: list[tuple[str, ray.ObjectRef]]) -> None:
        """Have Ray tell the completions when each task is done."""
        completions = self._completions
        if self._state.client:
            on_response = completions.on_client_response
            for uid, ref in submitted:
                # What _on_completed does, minus its unpickling: see results.
                client: Any = ref
                client._worker.register_callback(
                    ref, functools.partial(on_response, uid)
                )
        else:
            on_ready = completions.on_ready
            for uid, ref in submitted:
                ref._on_ready(functools.partial(on_ready, uid))

    def _remote_for(self, spec: TaskSpec, nested: bool) -> Any:
        res = spec.resources
        extra = spec.options.get("ray") if spec.options else None
        if spec.command is not None:
            base: Any = EXEC
            key: Any = "exec"
        else:
            base, key = self._runner(spec, nested)
        if res.is_default and not extra:
            return base
        if not res.is_default:
            self._check_resources(spec, res)
        if extra:
            return base.options(**self._task_options(spec, res, extra))
        variant = self._variants.get((key, res))
        if variant is None:
            variant = self._variants[(key, res)] = base.options(
                **self._task_options(spec, res, None)
            )
        return variant

    def _runner(self, spec: TaskSpec, nested: bool) -> tuple[Any, Any]:
        """The remote wrapper of the task's function; ``nested``: the variant
        that takes ObjectRefs nested in containers as extra arguments."""
        fn = spec.function
        key: Any = (fn, spec.is_async, spec.name, nested)
        try:
            remote = self.runners.get(key)
        except TypeError:  # an unhashable callable object
            key = (id(fn), spec.is_async, spec.name, nested)
            entry = self._by_id.get(key)
            if entry is None or entry[0] is not fn:
                entry = self._by_id[key] = (fn, self._wrap(spec, nested))
            return entry[1], key
        if remote is None:
            remote = self.runners[key] = self._wrap(spec, nested)
        return remote, key

    def _forget_runner(self, fn: Any) -> None:
        """Drop a function's cached wrappers after a failed submission.

        Ray Client pickles a function on its first ``.remote()``; when that
        fails, its wrapper keeps a half-made reference and every later call
        fails with an unrelated AttributeError.  A fresh wrapper fails the same
        clear way each time instead.
        """
        for cache in (self.runners, self._by_id, self._variants):
            for key in [k for k in cache if _is_for(k, fn)]:
                del cache[key]

    @staticmethod
    def _wrap(spec: TaskSpec, nested: bool) -> Any:
        assert spec.function is not None
        runner = function_runner(spec.function, spec.is_async, spec.name, nested)
        return ray.remote(max_retries=0)(runner)

    def _task_options(
        self, spec: TaskSpec, res: Resources, extra: Mapping[str, Any] | None
    ) -> dict[str, Any]:
        opts: dict[str, Any] = {"num_cpus": res.cores}
        if res.gpus:
            opts["num_gpus"] = res.gpus
        if res.memory:
            opts["memory"] = res.memory * 1024 * 1024
        if extra:
            if not isinstance(extra, Mapping) or _OWN_OPTIONS & set(extra):
                raise TaskDefinitionError(
                    f"task {spec.name!r}: options['ray'] must be a dict of Ray task "
                    f"options other than {sorted(_OWN_OPTIONS)} (asyncflow owns "
                    "returns and retries)"
                )
            opts.update(extra)
        return opts

    def _check_resources(self, spec: TaskSpec, res: Resources) -> None:
        if res.ranks > 1:
            raise ResourceUnavailableError(
                f"task {spec.name!r} asks for {res.ranks} MPI ranks; the Ray "
                "backend launches no MPI jobs: route it to an MPI-capable backend"
            )
        if not self._state.fail_infeasible:
            return
        need = {
            "CPU": res.cores,
            "GPU": res.gpus,
            "memory": (res.memory or 0) * 1024 * 1024,
        }
        for node in self._state.nodes:
            if all(node.get(k, 0) >= v for k, v in need.items() if v):
                return
        have = (
            ", ".join(
                f"{{CPU: {n.get('CPU', 0):g}, GPU: {n.get('GPU', 0):g}, "
                f"memory: {n.get('memory', 0) / 2**20:.0f} MB}}"
                for n in self._state.nodes
            )
            or "no alive node"
        )
        raise ResourceUnavailableError(
            f"task {spec.name!r} asks for cores={res.cores}, gpus={res.gpus}, "
            f"memory={res.memory} MB, which no node of this Ray cluster has "
            f"({have}); Ray would wait forever. Lower the request, or pass "
            "fail_infeasible=False for an autoscaling cluster"
        )

    def _native_args(self, spec: TaskSpec) -> tuple[tuple[Any, ...], dict[str, Any]]:
        nested: list[ray.ObjectRef] = []

        def handle(marker: Any) -> Any:
            if (
                marker.owner is not self._owner
            ):  # pragma: no cover - engine fetches these
                raise TaskDefinitionError(
                    f"task {spec.name!r}: got a value from another backend"
                )
            if type(marker) is RayValue:
                return marker.handle
            running = self._state.tasks.get(marker.uid)  # still running here (PIPELINE)
            if running is None:
                raise _Gone(marker.uid)
            return running.ref

        def slot(marker: Any) -> Slot:
            nested.append(handle(marker))
            return Slot(len(nested) - 1)

        def native(obj: Any) -> Any:
            """Top-level refs as themselves (Ray resolves those), nested ones as
            slots the worker fills from extra arguments."""
            if type(obj) in _MARKERS:
                return handle(obj)
            return replace(obj, _MARKERS, slot)

        args = tuple(native(a) for a in spec.args)
        kwargs = {k: native(v) for k, v in spec.kwargs.items()}
        if not nested:  # top-level refs only: Ray resolves them itself
            return args, kwargs
        kwargs[NESTED] = len(nested)
        return args + tuple(nested), kwargs


def _is_for(key: Any, fn: Any) -> bool:
    """Whether a wrapper cache key belongs to ``fn`` (the function itself or its
    id leads a runner key; a variant's key leads with its runner key)."""
    if isinstance(key, tuple) and key and isinstance(key[0], tuple):
        key = key[0]  # a variant: (runner key, resources)
    if not isinstance(key, tuple) or not key:
        return False
    head = key[0]
    return head is fn or (type(head) is int and head == id(fn))
