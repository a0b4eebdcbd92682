"""``task_description=``: radical.asyncflow's per-task request, in our terms.

Its scripts ask for ranks, cores, GPUs, memory and an environment with a dict
of radical.pilot ``TaskDescription`` keys, on the decorator, as the default of
a ``task_description`` parameter, or on a call.  The keys that mean the same on
every backend become ``resources=``/``env=``/``cwd=``; the rest are the
runtime's own options and go, untouched, to a backend that takes them
(radical.pilot's ``TaskDescription``, Ray's ``.options()``).  A key no backend
of the task understands is an error naming it, because a request silently
dropped is a job that runs with the wrong resources.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from .errors import TaskDefinitionError

if TYPE_CHECKING:
    from .protocol import ExecutionBackend

__all__ = ["declared_default", "merge", "translate"]

#: keys meaning the same on every backend -> the Resources field they set
RESOURCE_KEYS = {
    "ranks": "ranks",
    "cores_per_rank": "cores",
    "cores": "cores",
    "gpus_per_rank": "gpus",
    "gpus": "gpus",
    "memory": "memory",
}
#: the other portable keys
OTHER_KEYS = ("mem_per_rank", "environment", "cwd")
#: radical.pilot's output paths, which every backend honours (asyncflow.output)
STREAM_KEYS = ("stdout", "stderr")

#: runtime (``info.runtime``) -> the ``options=`` key its adapter reads
NATIVE_OPTIONS = {"radical.pilot": "radical", "ray": "ray"}


def declared_default(fn: Callable[..., Any], task: str) -> dict[str, Any]:
    """The default of ``fn``'s own ``task_description`` parameter, if any."""
    try:
        param = inspect.signature(fn).parameters.get("task_description")
    except (TypeError, ValueError):
        return {}
    if param is None or param.default in (inspect.Parameter.empty, None):
        return {}
    return dict(_checked(param.default, task))


def merge(*descriptions: Mapping[str, Any] | None) -> dict[str, Any]:
    """Later descriptions override earlier ones key by key."""
    out: dict[str, Any] = {}
    for d in descriptions:
        if d:
            out.update(d)
    return out


def translate(
    description: Mapping[str, Any],
    task: str,
    backend: ExecutionBackend | None,
    base: Mapping[str, Any],
) -> dict[str, Any]:
    """``TaskOptions.build`` keywords: ``base`` (the task's own options) with
    ``description`` applied on top."""
    description = _checked(description, task)
    if description and backend is None:
        raise TaskDefinitionError(
            f"block {task!r}: task_description= means nothing on a block, which "
            "runs in the driver; put it on the tasks the block calls"
        )
    resources, env, cwd, native = _portable(description, base)
    options = base.get("options")
    if native:
        assert backend is not None
        options = _with_native(dict(options or {}), native, task, backend)
    return {
        **base,
        **{k: description[k] for k in STREAM_KEYS if k in description},
        "resources": resources or None,
        "env": env or None,
        "cwd": cwd,
        "options": options,
    }


def _portable(
    description: Mapping[str, Any], base: Mapping[str, Any]
) -> tuple[dict[str, Any], dict[str, Any], Any, dict[str, Any]]:
    """``base``'s resources, env and cwd with ``description``'s portable keys
    applied, and the keys left over for the runtime itself."""
    resources = dict(_fields(base.get("resources")))
    env = dict(base.get("env") or {})
    cwd = base.get("cwd")
    native: dict[str, Any] = {}
    for key, value in description.items():
        if key in RESOURCE_KEYS:
            resources[RESOURCE_KEYS[key]] = value
        elif key == "environment":
            env.update(value or {})
        elif key == "cwd":
            cwd = value
        elif key not in STREAM_KEYS and key != "mem_per_rank":
            native[key] = value
    if "mem_per_rank" in description:
        ranks = resources.get("ranks", 1)
        resources["memory"] = _total_memory(description["mem_per_rank"], ranks)
    return resources, env, cwd, native


def _total_memory(per_rank: object, ranks: object) -> object:
    """A per-rank request times the ranks; anything else is left for
    ``Resources`` to reject with its own message."""
    if isinstance(per_rank, int | float) and isinstance(ranks, int):
        return math.ceil(per_rank * ranks)
    return per_rank


def _checked(description: object, task: str) -> Mapping[str, Any]:
    if not isinstance(description, Mapping):
        raise TaskDefinitionError(
            f"task {task!r}: task_description= must be a dict such as "
            f"{{'ranks': 4, 'cores_per_rank': 2}}, got {type(description).__name__}"
        )
    return description


def _fields(resources: object) -> Mapping[str, Any]:
    if resources is None:
        return {}
    if isinstance(resources, Mapping):
        return resources
    return {
        k: getattr(resources, k)
        for k in ("cores", "gpus", "memory", "ranks")
        if getattr(resources, k) is not None
    }


def _with_native(
    options: dict[str, Any],
    native: Mapping[str, Any],
    task: str,
    backend: ExecutionBackend,
) -> dict[str, Any]:
    key = NATIVE_OPTIONS.get(backend.info.runtime)
    if key is None:
        portable = sorted([*RESOURCE_KEYS, *OTHER_KEYS, *STREAM_KEYS])
        raise TaskDefinitionError(
            f"task {task!r}: task_description key(s) {sorted(native)} mean nothing "
            f"on backend {backend.info.name!r} ({backend.info.runtime}); every "
            f"backend understands {', '.join(portable)}, and only radical.pilot "
            "and Ray take their own options; drop the key or route the task "
            "with backend=..."
        )
    return {**options, key: {**(options.get(key) or {}), **native}}
