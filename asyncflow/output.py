"""An executable task's output, of any size, without surprises.

A command writes its stdout and stderr to files, never to pipes the worker reads
into memory: a task that prints a gigabyte must not cost the worker (or, on the
thread and process pools, the driver) a gigabyte.  After the command exits:

* stdout up to :attr:`Capture.limit` bytes (``output_limit=``, default
  :data:`OUTPUT_LIMIT`) becomes the task's value, decoded as UTF-8 (``text=True``,
  the default) or as ``bytes`` (``text=False``).  Output that is not UTF-8 fails the
  task with :class:`~asyncflow.errors.OutputDecodeError` instead of being replaced
  silently: pass ``text=False`` for binary output.
* larger stdout stays in its file, in the backend's temp space, and the task's
  value is an :class:`StdoutFile` saying where.  The backend removes that space at
  shutdown, so read or move the file before; or give ``stdout=PATH`` (and
  ``stderr=PATH``, as in a batch script), which the command writes to directly and
  which asyncflow never removes: the task's value is then an :class:`StdoutFile`
  for ``PATH`` whatever its size.
* a failed command's :class:`~asyncflow.errors.ExecutableFailedError` carries the
  last ``limit`` bytes of each stream, with bytes that are not UTF-8 shown as
  ``\\xNN`` escapes, and says where the whole stream is if it was cut.

Kept free of runtimes: workers of every backend import it.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import IO, Any

from .errors import OutputDecodeError, TaskDefinitionError

__all__ = ["OUTPUT_LIMIT", "Capture", "StdoutFile", "collect", "tail"]

#: bytes of one stream held in memory before it stays in its file (16 MiB)
OUTPUT_LIMIT = 16 * 2**20


@dataclass(frozen=True, slots=True)
class StdoutFile:
    """A command's output left in a file: ``path`` and its ``size`` in bytes.

    ``os.fspath()`` works on it, so it can be passed on to anything taking a path,
    including the next executable task's command line.
    """

    path: str
    size: int

    def __fspath__(self) -> str:
        return self.path

    def read_bytes(self) -> bytes:
        with open(self.path, "rb") as f:
            return f.read()

    def read_text(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        with open(self.path, encoding=encoding, errors=errors) as f:
            return f.read()

    def open(self, mode: str = "rb") -> IO[Any]:
        return open(self.path, mode)


@dataclass(frozen=True, slots=True)
class Capture:
    """How an executable task's output is kept (its ``stdout=``, ``stderr=``,
    ``text=`` and ``output_limit=`` options), validated at decoration time."""

    stdout: str | None = None
    stderr: str | None = None
    text: bool = True
    limit: int = OUTPUT_LIMIT

    @classmethod
    def build(
        cls,
        task: str,
        stdout: Any = None,
        stderr: Any = None,
        text: Any = True,
        limit: Any = None,
    ) -> Capture:
        if not isinstance(text, bool):
            raise TaskDefinitionError(
                f"task {task!r}: text= must be True (stdout as str) or False "
                f"(bytes), got {text!r}"
            )
        if limit is None:
            limit = OUTPUT_LIMIT
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise TaskDefinitionError(
                f"task {task!r}: output_limit= must be a number of bytes >= 0, "
                f"got {limit!r}"
            )
        return cls(
            _path(task, "stdout", stdout), _path(task, "stderr", stderr), text, limit
        )


def _path(task: str, keyword: str, value: Any) -> str | None:
    """An absolute path: a relative one is taken from the driver's working
    directory now, not from wherever a worker happens to run."""
    if value is None:
        return None
    try:
        path = os.fspath(value)
    except TypeError:
        path = None
    if not isinstance(path, str) or not path:
        raise TaskDefinitionError(
            f"task {task!r}: {keyword}= must be a file path (str or os.PathLike), "
            f"got {value!r}"
        )
    return os.path.abspath(path)


DEFAULT = Capture()


def collect(
    path: str, capture: Capture, task: str, *, own: bool
) -> str | bytes | StdoutFile:
    """A finished command's stdout, from the file it wrote.

    ``own``: the file is the worker's temp file (removed here once read), not one
    the user named.
    """
    size = os.path.getsize(path)
    if capture.stdout is not None or size > capture.limit:
        return StdoutFile(path, size)
    with open(path, "rb") as f:
        data = f.read()
    if own:
        with contextlib.suppress(OSError):
            os.unlink(path)
    if not capture.text:
        return data
    try:
        return data.decode()
    except UnicodeDecodeError as exc:
        raise OutputDecodeError(task, "stdout", exc) from None


def tail(path: str, limit: int) -> str:
    """The last ``limit`` bytes of a stream, for an error message: bytes that are
    not UTF-8 escaped, and a first line saying what was cut and where it is."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - limit))
            data = f.read()
    except OSError:
        return ""
    text = data.decode(errors="backslashreplace")
    cut = size - len(data)
    if cut > 0:
        text = f"[{cut} earlier bytes are in {path}]\n{text}"
    return text
