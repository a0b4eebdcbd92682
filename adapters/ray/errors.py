"""Ray's failures, translated into asyncflow's errors.

Ray wraps the user's exception in RayTaskError and reports lost workers, nodes
and objects, memory kills and serialisation failures in its own terms; the
engine and its users expect the user's own exception, WorkerLostError,
SerializationError or ResourceUnavailableError with a hint at the fix.  Kept in
one place so that submission, completions and fetches agree.
"""

from __future__ import annotations

import pickle

import ray.exceptions as rex

from ...errors import (
    ResourceUnavailableError,
    SerializationError,
    TaskDefinitionError,
    WorkerLostError,
)
from ...spec import TaskSpec

__all__ = ["submit_error", "task_error"]


def task_error(name: str, err: BaseException) -> BaseException:
    """The user's own exception for a task failure; WorkerLostError when Ray
    lost the worker, the node or the object."""
    if isinstance(err, rex.RayTaskError):
        cause = err.cause
        if isinstance(cause, RuntimeError) and "failed to import on the worker" in str(
            cause
        ):
            return SerializationError(
                f"task {name!r}: its function could not be loaded on the Ray worker "
                f"({str(cause).splitlines()[0]}); define it in a module the workers "
                "can import, or register the module with "
                "ray.cloudpickle.register_pickle_by_value"
            )
        if isinstance(cause, BaseException) and not isinstance(cause, rex.RayError):
            return cause
        if isinstance(cause, rex.RayError):
            err = cause
        else:
            return err
    if isinstance(err, rex.TaskCancelledError):
        return WorkerLostError(
            f"task {name!r} was cancelled inside Ray, not through asyncflow ({err})"
        )
    if isinstance(err, rex.OutOfMemoryError):
        return WorkerLostError(
            f"task {name!r}: Ray killed its worker because the node ran out of "
            f"memory; ask for more with resources={{'memory': MB}} ({err})"
        )
    if isinstance(err, rex.ObjectLostError):
        return WorkerLostError(
            f"task {name!r}: a value it needs was lost from "
            f"Ray's object store ({type(err).__name__}: {err})"
        )
    if isinstance(
        err,
        rex.RaySystemError
        | rex.WorkerCrashedError
        | rex.NodeDiedError
        | rex.LocalRayletDiedError,
    ):
        return WorkerLostError(
            f"task {name!r}: the Ray worker running it died "
            f"({type(err).__name__}: {err})"
        )
    return err


def submit_error(spec: TaskSpec, exc: Exception) -> BaseException:
    text = str(exc)
    first = text.split("\n", 1)[0]
    ray_says = "serializ" in text.lower()
    # Ray says "serialize"; Ray Client (ray://) pickles on the client and raises
    # pickle's own "cannot pickle '_thread.lock' object", naming neither side.
    if isinstance(exc, TypeError | pickle.PicklingError) and (
        ray_says or "pickle" in first
    ):
        if ray_says:
            what = "its function" if "function" in first else "an argument"
        else:
            what = "its function or an argument"
        return SerializationError(
            f"task {spec.name!r}: {what} cannot be serialised for Ray ({first}); "
            "define functions at module level and do not capture locks, sockets "
            "or open files"
        )
    if isinstance(exc, ValueError) and "resource" in text.lower():
        return ResourceUnavailableError(f"task {spec.name!r}: {text}")
    if isinstance(exc, TypeError):  # the arguments do not fit the signature
        return TaskDefinitionError(f"task {spec.name!r} was called wrongly: {text}")
    return exc
