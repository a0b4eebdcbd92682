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


def _task_error(name: str, err: rex.RayError) -> BaseException:
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


def _submit_error(spec: TaskSpec, exc: Exception) -> BaseException:
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


# -- attaching ------------------------------------------------------------------------
_TOKEN_FIX = (
    "set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH to the cluster's token file "
    "(examples/slurm/ray-cluster.sbatch writes it to $RAY_JOB_DIR/auth_token), or "
    "put the token itself in RAY_AUTH_TOKEN"
)


def _token_refused(address: str, mode_is_token: bool) -> str:
    """What to do when the cluster at ``address`` refused this driver's token."""
    if mode_is_token:
        why = (
            "refused this driver's token (from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH "
            "or ~/.ray/auth_token, in that order): it is not the cluster's"
        )
    else:
        why = "has token authentication on, and this driver sent no token"
    return f"the Ray cluster at {address} {why}; {_TOKEN_FIX}"


def _attach_hint(address: str, exc: BaseException, mode_is_token: bool) -> str | None:
    """A sentence saying what to fix when ``ray.init(address=...)`` failed, or None.

    Ray reports a refused token as a bare ``ConnectionError`` after retrying for
    20 s, with the AuthenticationError only as text inside its cause; through
    Ray Client it times out after 30 s without naming authentication at all.
    """
    seen: BaseException | None = exc
    while seen is not None:
        refused = "InvalidAuthToken" in str(seen)
        if refused or isinstance(seen, rex.AuthenticationError):
            return _token_refused(address, mode_is_token)
        seen = seen.__cause__ or seen.__context__
    if address.startswith("ray://") and not mode_is_token:
        return (
            f"if the Ray cluster at {address} uses token authentication (Ray 2.60 "
            f"turns it on for every head not on loopback), {_TOKEN_FIX}"
        )
    return None
