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

import pickle
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import cloudpickle

from ...errors import (
    BackendError,
    EngineClosedError,
    ResourceUnavailableError,
    SerializationError,
    TaskDefinitionError,
)
from ...spec import DEFAULT_RESOURCES, TaskSpec
from ...worker import dumps_function
from .base import _Task
from .cancel import _INPROC
from .executors import _Profile
from .results import _ResultsMixin
from .worker import _run_command, _run_inproc, _run_packed


class _SubmitMixin(_ResultsMixin):
    """``submit`` and everything between a spec and its ``dfk.submit`` call."""

    # -- submission --------------------------------------------------------------
    def submit(self, specs: Sequence[TaskSpec]) -> None:
        sink = self._sink
        dfk = self._dfk
        assert sink is not None and dfk is not None
        if self._closed or dfk.cleanup_called:
            for spec in specs:
                sink.set_exception(
                    spec.uid,
                    EngineClosedError(
                        f"task {spec.name!r}: the Parsl DataFlowKernel is shut down"
                    ),
                )
            return
        control = self._runtime.control
        ctl = control.ctl if control is not None else None
        tasks = self._tasks
        token = self._token
        counter = self._counter
        dsubmit = dfk.submit
        done = self._done
        default = self._label
        profiles = self._profiles
        for spec in specs:
            uid = spec.uid
            options = spec.options
            label = default
            if options and self._routable and "executor" in options:
                label = options["executor"]
            try:
                profile = profiles[label]
            except (KeyError, TypeError):
                sink.set_exception(
                    uid,
                    TaskDefinitionError(
                        f"task {spec.name!r}: options['executor']={label!r} is not "
                        "an executor of this Parsl configuration; it has "
                        f"{sorted(profiles)}"
                    ),
                )
                continue
            if (
                spec.resources is DEFAULT_RESOURCES
                and not profile.mpi
                and not (options and "parsl_resource_specification" in options)
            ):
                app_kwargs: dict[str, Any] = {}
            else:
                try:
                    app_kwargs = self._app_kwargs(spec, profile)
                except (ResourceUnavailableError, TaskDefinitionError) as exc:
                    sink.set_exception(uid, exc)
                    continue
            key = f"{token}.{next(counter)}"
            try:
                packed = False
                if spec.command is not None:
                    fn: Callable[..., Any] = _run_command
                    args: tuple[Any, ...] = (
                        spec.command,
                        key,
                        spec.name,
                        _INPROC
                        if profile.in_process
                        else ctl
                        if profile.local
                        else None,
                    )
                elif profile.in_process:
                    fn = _run_inproc
                    args = (
                        spec.function,
                        spec.args,
                        spec.kwargs,
                        spec.is_async,
                        spec.name,
                        key,
                    )
                else:
                    fn = _run_packed
                    args = (self._pack(spec, key, ctl if profile.local else None),)
                    packed = True
                fut = dsubmit(fn, args, [label], False, None, app_kwargs)
            except SerializationError as exc:
                sink.set_exception(uid, exc)
                continue
            except Exception as exc:
                sink.set_exception(
                    uid,
                    BackendError(
                        f"task {spec.name!r}: Parsl refused it ({type(exc).__name__}: "
                        f"{exc})"
                    ),
                )
                continue
            fut._asyncflow_uid = uid  # type: ignore[attr-defined]
            tasks[uid] = _Task(spec.name, key, spec.command is not None, label, packed)
            fut.add_done_callback(done)

    def _app_kwargs(self, spec: TaskSpec, profile: _Profile) -> dict[str, Any]:
        res = spec.resources
        opts = spec.options
        extra = opts.get("parsl_resource_specification") if opts else None
        if res.is_default and not extra and not profile.mpi:
            return {}
        rspec = profile.resource_spec(res, spec.name)
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
        return {"parsl_resource_specification": rspec} if rspec else {}

    def _pickle(self, spec: TaskSpec) -> bytes:
        fn = spec.function
        try:
            return self._pickled[fn]
        except KeyError:
            pass
        except TypeError:  # unhashable callable
            return self._dumps(spec)
        blob = self._pickled[fn] = self._dumps(spec)
        return blob

    @staticmethod
    def _dumps(spec: TaskSpec) -> bytes:
        try:
            assert spec.function is not None
            return dumps_function(spec.function)
        except Exception as exc:
            raise SerializationError(
                f"task {spec.name!r}: its function cannot be serialised for Parsl "
                f"workers ({type(exc).__name__}: {exc}); define it at module level "
                "and do not capture locks, sockets or open files"
            ) from exc

    def _pack(self, spec: TaskSpec, key: str, ctl: str | None) -> bytes:
        blob = self._pickle(spec)
        item = (blob, spec.args, spec.kwargs, spec.is_async, spec.name, key, ctl)
        try:
            # The C pickler first: cloudpickle costs more per call than a no-op
            # task's whole payload.  Anything it would pin to the driver's
            # __main__ by name goes through cloudpickle, which ships it by value.
            data = pickle.dumps(item, protocol=5)
            if b"__main__" not in data or (
                data.count(b"__main__") == blob.count(b"__main__")
            ):
                return data
        except Exception:
            pass
        try:
            return cloudpickle.dumps(item, protocol=5)
        except Exception as exc:
            raise SerializationError(
                f"task {spec.name!r}: an argument cannot be serialised for Parsl "
                f"workers ({type(exc).__name__}: {exc}); pass plain data"
            ) from exc
