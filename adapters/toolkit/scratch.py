"""A temp dir a backend owns, and the commands its workers list there.

A worker process lists the pid of each command it runs in a folder named by
:data:`asyncflow.commands.COMMAND_PIDS_ENV`, so that a command whose worker was
killed (a nanny's SIGKILL, a driver stopped by Ctrl-C) is still found and
killed at shutdown.  Keeping that folder inside the backend's own temp dir
means one ``close()`` kills the strays and removes everything.
"""

from __future__ import annotations

import os
import shutil
import tempfile

from ...commands import COMMAND_PIDS_ENV, kill_listed, pid_dir_under


class Scratch:
    """A private temp dir, made by :meth:`make`, removed by :meth:`close`."""

    __slots__ = ("path",)

    def __init__(self) -> None:
        self.path: str | None = None

    def make(self, prefix: str, base: str | None = None) -> str:
        self.path = tempfile.mkdtemp(prefix=prefix, dir=base)
        return self.path

    def command_env(self) -> dict[str, str]:
        """The environment a worker needs to list its commands here."""
        assert self.path is not None
        pid_dir = pid_dir_under(self.path)
        os.makedirs(pid_dir, exist_ok=True)
        return {COMMAND_PIDS_ENV: pid_dir}

    def close(self) -> int:
        """Kill the commands still listed, remove the dir; how many were killed."""
        path, self.path = self.path, None
        if path is None:
            return 0
        killed = kill_listed(pid_dir_under(path))
        shutil.rmtree(path, ignore_errors=True)
        return killed
