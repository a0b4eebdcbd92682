"""Result-store keys: what a task's result depends on, in 64 hex digits.

A function task's key covers its identity (module, qualified name, a hash of its
source and the ``version=`` the user gave) and its arguments, where each upstream
task's future stands for that task's own key rather than for its value: a chain
is keyed without hashing the data that flows along it, and a changed body
changes its own key and, through them, its dependents' keys, and no one else's.

An executable task is keyed on what it runs, known once its body has built the
command: argv, env, cwd, its output options, and the content of every
:class:`~asyncflow.data.InputFile` among its arguments.

Arguments are hashed through their pickle.  A value whose pickle differs from
run to run (a ``set`` of strings, whose order follows the per-process hash
seed) gives a different key each run: the task runs again, it never returns a
wrong value.  A value that cannot be pickled makes the task uncacheable.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import os
from typing import Any

import cloudpickle

from .data import InputFile, OutputFile
from .future import TaskFuture
from .spec import Command
from .walk import find, replace

__all__ = ["command_key", "function_key", "identity"]

_VERSION = b"asyncflow-key-1\0"
_MARKERS = frozenset({TaskFuture, InputFile, OutputFile})


@functools.lru_cache(maxsize=4096)
def identity(fn: Any, version: str | None) -> bytes:
    """What names ``fn`` and its code: a changed body is a new identity."""
    code = getattr(fn, "__code__", None)
    try:
        source = inspect.getsource(fn).encode()
    except (OSError, TypeError):
        source = code.co_code + repr(_consts(code)).encode() if code else b""
    name = f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', fn)!s}"
    return hashlib.sha256(
        b"\0".join([name.encode(), source, (version or "").encode()])
    ).digest()


def _consts(code: Any) -> tuple[Any, ...]:
    """A code object's constants, nested code objects by their own bytes."""
    return tuple(
        (c.co_code, _consts(c)) if inspect.iscode(c) else c for c in code.co_consts
    )


def function_key(
    fn: Any, version: str | None, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> str | None:
    """The key of a call, or ``None`` if it has none (an upstream without a
    key, an argument that cannot be pickled)."""
    digest = _arguments(args, kwargs)
    if digest is None:
        return None
    return hashlib.sha256(_VERSION + identity(fn, version) + digest).hexdigest()


def command_key(
    fn: Any,
    version: str | None,
    command: Command,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> str | None:
    """The key of a command an executable task's body built from ``args``."""
    h = hashlib.sha256(_VERSION + b"command\0" + identity(fn, version))
    h.update(repr((command.argv, sorted((command.env or {}).items()))).encode())
    h.update(repr((command.cwd, command.capture)).encode())
    for f in find((args, kwargs), InputFile):
        content = _file_digest(f.filepath)
        if content is None:
            return None
        h.update(f.filepath.encode() + content)
    return h.hexdigest()


class _NoKey(Exception):
    pass


def _stand_in(marker: Any) -> tuple[str, str]:
    """An upstream by its key, a declared file by its path."""
    if type(marker) is TaskFuture:
        key = marker._cache_key
        if key is None:
            raise _NoKey
        return ("asyncflow-upstream", key)
    return ("asyncflow-file", marker.filepath)


def _arguments(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bytes | None:
    try:
        plain = replace((args, sorted(kwargs.items())), _MARKERS, _stand_in)
        return hashlib.sha256(cloudpickle.dumps(plain, protocol=5)).digest()
    except _NoKey:
        return None
    except Exception:  # unpicklable: no key, the task simply runs
        return None


def _file_digest(path: str) -> bytes | None:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except OSError:
        return None
    return h.digest()


def output_digests(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, str]:
    """SHA-256 of each declared :class:`~asyncflow.data.OutputFile` (``""`` for
    one that does not exist)."""
    out = {}
    for f in find((args, kwargs), OutputFile):
        digest = _file_digest(f.filepath)
        out[f.filepath] = digest.hex() if digest else ""
    return out


def outputs_unchanged(recorded: dict[str, str]) -> bool:
    """Whether every recorded output file still exists with its recorded hash."""
    for path, digest in recorded.items():
        now = _file_digest(path) if os.path.exists(path) else None
        if not digest or now is None or now.hex() != digest:
            return False
    return True
