"""Files a task reads or writes, declared in its arguments.

``InputFile(path)`` and ``OutputFile(path)`` are radical.asyncflow's data
declarations.  In a command they read as their path (``f"sort {src} > {dst}"``,
``os.fspath``), so the script does not change.  They also order work: with the
engine's ``implicit_data=True`` (the default), a task given ``InputFile(p)``
waits for the latest task, still known to the engine, that declared
``OutputFile(p)``, as if that task's future were among its arguments; a failure
there fails it with :class:`~asyncflow.errors.DependencyFailureError`.

Paths are made absolute where the task is declared, so a relative name means the
same file to the task that writes it and the one that reads it.  Every backend
here shares the driver's file system (a cluster's shared one, on Slurm);
asyncflow moves no data itself, so a remote URL is an error rather than a
download that would silently happen in the wrong place.
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import urlparse

from .errors import TaskDefinitionError
from .walk import find

__all__ = ["File", "FileLinks", "InputFile", "OutputFile"]


class File:
    """A path a task declares; reads as the path in strings and ``os.fspath``."""

    __slots__ = ("filename", "filepath")

    #: set once any file is declared: until then the engine skips looking
    declared = False

    def __init__(self, path: str | os.PathLike[str]) -> None:
        File.declared = True
        raw = os.fspath(path)
        if not isinstance(raw, str) or not raw:
            raise TaskDefinitionError(
                f"{type(self).__name__}() needs a file path, got {path!r}"
            )
        url = urlparse(raw)
        if url.scheme == "file":
            raw = url.path
        elif url.scheme and len(url.scheme) > 1:  # not a Windows drive letter
            raise TaskDefinitionError(
                f"{type(self).__name__}({raw!r}): asyncflow moves no data, so only "
                "paths on a file system the workers share (or file:// URLs) work; "
                "download the file first and pass its path"
            )
        self.filepath = os.path.abspath(raw)
        self.filename = os.path.basename(self.filepath)

    def __fspath__(self) -> str:
        return self.filepath

    def __str__(self) -> str:
        return self.filepath

    def __format__(self, spec: str) -> str:
        return format(self.filepath, spec)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.filepath!r})"

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.filepath == self.filepath

    def __hash__(self) -> int:
        return hash((type(self), self.filepath))

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.filepath,))


class InputFile(File):
    """A file the task reads."""

    __slots__ = ()


class OutputFile(File):
    """A file the task writes."""

    __slots__ = ()


class FileLinks:
    """The engine's record of the last task to declare each ``OutputFile``."""

    def __init__(self) -> None:
        self._writers: dict[str, Any] = {}

    def link(
        self, task: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> list[Any]:
        """Note ``task``'s outputs; return the writers of its inputs (the
        engine calls it only once some file was declared)."""
        reads: list[str] = []
        writes: list[str] = []
        for f in find((args, kwargs), _FILES):
            (reads if type(f) is InputFile else writes).append(f.filepath)
        writers = {
            id(w): w
            for path in reads
            if (w := self._writers.get(path)) is not None and w is not task
        }
        for path in writes:
            self._writers[path] = task
        return list(writers.values())


_FILES = frozenset({InputFile, OutputFile})
