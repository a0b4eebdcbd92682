"""Functions pickled once per backend, arguments pickled cheaply.

cloudpickle ships closures and ``__main__`` functions by value, which other
processes need, but it costs more per call than a no-op task's whole payload.
So a function is pickled once and its bytes reused for every call, and
arguments go through the C pickler unless that would pin something to the
driver's ``__main__`` by name.  A value that cannot travel fails the task with
an error that names it and the runtime, at submission.
"""

from __future__ import annotations

import pickle
from typing import Any

import cloudpickle

from ...errors import SerializationError
from ...spec import TaskSpec
from ...worker import dumps_function


class FunctionCache:
    """Pickled functions by identity, for one backend's lifetime."""

    __slots__ = ("_blobs", "runtime")

    def __init__(self, runtime: str):
        self.runtime = runtime  # "Dask", "Parsl workers", ...: for the errors
        self._blobs: dict[Any, bytes] = {}

    def blob(self, spec: TaskSpec) -> bytes:
        """The pickled function of ``spec``; SerializationError naming the task."""
        fn = spec.function
        try:
            return self._blobs[fn]
        except KeyError:
            pass
        except TypeError:  # an unhashable callable object
            return self._dumps(spec)
        blob = self._blobs[fn] = self._dumps(spec)
        return blob

    def _dumps(self, spec: TaskSpec) -> bytes:
        try:
            assert spec.function is not None
            return dumps_function(spec.function)
        except Exception as exc:
            raise SerializationError(
                f"task {spec.name!r}: its function cannot be serialised for "
                f"{self.runtime} ({type(exc).__name__}: {exc}); define it at "
                "module level and do not capture locks, sockets or open files"
            ) from exc

    def clear(self) -> None:
        self._blobs.clear()


def pack(item: Any, spec: TaskSpec, runtime: str, blob: bytes = b"") -> bytes:
    """``item`` (a call's function blob, arguments and the like) as bytes.

    ``blob`` is the function's own pickle inside ``item``: its ``__main__``
    references were made by value and are not a reason to use cloudpickle.
    """
    try:
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
            f"task {spec.name!r}: an argument cannot be serialised for {runtime} "
            f"({type(exc).__name__}: {exc}); pass plain data"
        ) from exc
