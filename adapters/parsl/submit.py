"""Submission: each ready spec becomes one ``dfk.submit``.

Parsl's own dependency tracking is bypassed: the engine only hands over ready
work, so each spec goes to its executor with plain arguments.  User arguments
travel packed inside one positional argument, never as Parsl keyword arguments:
names such as ``inputs``, ``outputs``, ``stdout`` or ``walltime`` mean something
to Parsl and must not be reinterpreted.  For out-of-process executors the
adapter pickles function and arguments itself (cloudpickle where plain pickle
would pin something to ``__main__``), so serialisation errors name the task as
on every other backend, and Parsl's dill only moves one bytes object per task,
which halves its per-task cost.  ``resources`` and
``options["parsl_resource_specification"]`` become Parsl's resource
specification (see ``executors``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from typing import Any

from ...errors import (
    BackendError,
    EngineClosedError,
    ResourceUnavailableError,
    SerializationError,
    TaskDefinitionError,
)
from ...spec import DEFAULT_RESOURCES, TaskSpec
from ..toolkit import FunctionCache, pack
from .cancel import INPROC
from .executors import Profile
from .results import translate
from .state import State, Task, bad_state
from .worker import command_task, inproc_task, packed_task

#: who the serialisation errors say could not be reached
_RUNTIME = "Parsl workers"


class Submitter:
    """Everything between a spec and its ``dfk.submit`` call."""

    __slots__ = ("_done", "_state", "functions")

    def __init__(self, state: State, done: Callable[[Future[Any]], None]):
        self._state = state
        self._done = done  # every AppFuture's done callback
        self.functions = FunctionCache(_RUNTIME)

    def submit(self, specs: Sequence[TaskSpec]) -> None:
        state = self._state
        sink, dfk = state.sink, state.dfk
        assert sink is not None and dfk is not None
        if state.life.closed or dfk.cleanup_called:
            for spec in specs:
                sink.set_exception(
                    spec.uid,
                    EngineClosedError(
                        f"task {spec.name!r}: the Parsl DataFlowKernel is shut down"
                    ),
                )
            return
        for spec in specs:
            try:
                label, profile = self._route(spec)
                app_kwargs = self._app_kwargs(spec, profile)
            except (ResourceUnavailableError, TaskDefinitionError) as exc:
                sink.set_exception(spec.uid, exc)
                continue
            self._send(spec, label, profile, app_kwargs)

    def _route(self, spec: TaskSpec) -> tuple[str, Profile]:
        """The executor ``spec`` goes to: the backend's, or the one its options
        name (unless the backend is bound to one executor)."""
        state = self._state
        options = spec.options
        label = state.label
        if options and state.routable and "executor" in options:
            label = options["executor"]
        try:
            return label, state.profiles[label]
        except (KeyError, TypeError):
            raise TaskDefinitionError(
                f"task {spec.name!r}: options['executor']={label!r} is not "
                "an executor of this Parsl configuration; it has "
                f"{sorted(state.profiles)}"
            ) from None

    def _send(
        self, spec: TaskSpec, label: str, profile: Profile, app_kwargs: dict[str, Any]
    ) -> None:
        """One ``dfk.submit``; a refusal fails the task, not the batch."""
        state = self._state
        assert state.sink is not None and state.dfk is not None
        command = spec.command is not None
        gone = bad_state(state, label)
        if gone is not None:
            # Fail here, not in Parsl, which raises one shared exception for
            # every task and logs each with a traceback that grows by every
            # raise before: minutes for a few thousand tasks.
            lost = Task(spec.name, "", command, label, False)
            state.sink.set_exception(spec.uid, translate(gone, lost))
            return
        key = f"{state.token}.{next(state.counter)}"
        try:
            fn, args, packed = self._call(spec, profile, key)
            fut = state.dfk.submit(fn, args, [label], False, None, app_kwargs)
        except SerializationError as exc:
            state.sink.set_exception(spec.uid, exc)
            return
        except Exception as exc:
            state.sink.set_exception(
                spec.uid,
                BackendError(
                    f"task {spec.name!r}: Parsl refused it ({type(exc).__name__}: "
                    f"{exc})"
                ),
            )
            return
        fut._asyncflow_uid = spec.uid  # type: ignore[attr-defined]
        state.tasks[spec.uid] = Task(spec.name, key, command, label, packed)
        fut.add_done_callback(self._done)

    def _call(
        self, spec: TaskSpec, profile: Profile, key: str
    ) -> tuple[Callable[..., Any], tuple[Any, ...], bool]:
        """The worker function, its arguments, and whether its result comes
        back pickled; the cancel channel follows where the executor runs."""
        control = self._state.runtime.control
        ctl = control.ctl if control is not None and profile.local else None
        if spec.command is not None:
            where = INPROC if profile.in_process else ctl
            return command_task, (spec.command, key, spec.name, where), False
        if profile.in_process:
            args = (spec.function, spec.args, spec.kwargs, spec.is_async, spec.name)
            return inproc_task, (*args, key), False
        blob = self.functions.blob(spec)
        item = (blob, spec.args, spec.kwargs, spec.is_async, spec.name, key, ctl)
        return packed_task, (pack(item, spec, _RUNTIME, blob),), True

    def _app_kwargs(self, spec: TaskSpec, profile: Profile) -> dict[str, Any]:
        """Parsl's ``parsl_resource_specification`` for ``spec``, if any."""
        opts = spec.options
        extra = opts.get("parsl_resource_specification") if opts else None
        res = spec.resources
        if res is DEFAULT_RESOURCES and not profile.mpi and extra is None:
            return {}  # the common case, decided without a call
        rspec = _resource_spec(spec, profile, extra)
        return {"parsl_resource_specification": rspec} if rspec else {}


def _resource_spec(spec: TaskSpec, profile: Profile, extra: Any) -> dict[str, Any]:
    """The executor's translation of the task's resources, overlaid with what
    the user passed in ``options`` for Parsl verbatim."""
    if spec.resources.is_default and not extra and not profile.mpi:
        return {}
    rspec = profile.resource_spec(spec.resources, spec.name)
    if extra:
        if not isinstance(extra, Mapping):
            raise TaskDefinitionError(
                f"task {spec.name!r}: options['parsl_resource_specification'] "
                f"must be a dict, got {type(extra).__name__}"
            )
        rspec = {**rspec, **extra}
    if rspec and profile.in_process:
        raise ResourceUnavailableError(
            f"task {spec.name!r}: Parsl's ThreadPoolExecutor "
            f"({profile.label!r}) takes no parsl_resource_specification "
            f"({sorted(rspec)})"
        )
    return rspec
