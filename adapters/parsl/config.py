"""What ``ParslExecutionBackend()`` loads, and the environment HTEX needs.

The default configuration is a loopback-only HighThroughputExecutor whose run
directory lives in a temp dir that shutdown removes, with Parsl logging at
WARNING: Parsl's defaults (DEBUG, ``./runinfo``) write 100+ MB per benchmark.
HTEX finds ``process_worker_pool.py`` and ``interchange.py`` on PATH, which a
venv used without activation lacks: the default configuration sets PATH in
``worker_init``, and ``fix_path`` puts this interpreter's ``bin/`` on PATH
before any other configuration is loaded.
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import sys
from collections.abc import Callable, Iterable
from typing import Any

from parsl.config import Config
from parsl.executors import HighThroughputExecutor
from parsl.executors.base import ParslExecutor
from parsl.logconfigs.base import LogConfig
from parsl.providers import LocalProvider

from ...commands import COMMAND_PIDS_ENV


class QuietFileLogging(LogConfig):
    """Parsl logs (``parsl.log``, interchange and worker logs) at ``level``.

    Like Parsl's ``FileLogging``, but its undo also closes the file, so a cleaned
    up DFK leaves no open handle (and no ``ResourceWarning``) behind.
    """

    def __init__(self, level: int = logging.WARNING):
        super().__init__()
        self.level = level

    def initialize_logging(self, *, log_dir: Any, log_name: str) -> Callable[[], None]:
        os.makedirs(log_dir, exist_ok=True)
        handler = logging.FileHandler(os.path.join(log_dir, log_name + ".log"))
        handler.setLevel(self.level)
        handler.setFormatter(
            logging.Formatter(
                "%(asctime)s %(processName)s-%(process)d %(threadName)s %(name)s:"
                "%(lineno)d %(levelname)s: %(message)s"
            )
        )
        logger = logging.getLogger("parsl")
        if logger.level == logging.NOTSET:
            logger.setLevel(self.level)  # keeps Parsl's per-task INFO calls cheap
        logger.addHandler(handler)

        def undo() -> None:
            logger.removeHandler(handler)
            handler.close()

        return undo


def local_htex_config(
    run_dir: str,
    *,
    max_workers: int = 2,
    label: str = "htex",
    log_level: int = logging.WARNING,
    heartbeat_period: int = 2,
    worker_tmpdir: str | None = None,
    command_pids: str | None = None,
) -> Config:
    """The configuration ``ParslExecutionBackend()`` loads.

    One block of ``max_workers`` HTEX workers on this machine, every socket on
    127.0.0.1, blocks started on the first strategy tick (0.2 s, not Parsl's
    5 s), no autoscaling, and the workers given this interpreter's ``bin/`` and
    ``sys.path`` so that they import what the driver imports.  ``worker_tmpdir``
    becomes the workers' ``TMPDIR`` (created if missing): the worker pool's
    multiprocessing manager leaves a ``pymp-*`` directory there when its block
    is stopped, so the default backend points it into the temp dir it removes.
    ``command_pids`` is where the workers list their running commands (see
    :data:`asyncflow.commands.COMMAND_PIDS_ENV`), so that shutdown can kill those
    whose worker died.
    """
    lines = driver_python_lines()
    if worker_tmpdir is not None:
        quoted = shlex.quote(worker_tmpdir)
        lines.append(f"mkdir -p {quoted} && export TMPDIR={quoted}")
    if command_pids is not None:
        quoted = shlex.quote(command_pids)
        lines.append(f"mkdir -p {quoted} && export {COMMAND_PIDS_ENV}={quoted}")
    worker_init = "\n".join(lines)
    htex = HighThroughputExecutor(
        label=label,
        address="127.0.0.1",
        loopback_address="127.0.0.1",
        max_workers_per_node=max_workers,
        cores_per_worker=1,
        heartbeat_period=heartbeat_period,
        heartbeat_threshold=max(30, 10 * heartbeat_period),
        interchange_launch_cmd=interchange_command(worker_tmpdir),
        provider=LocalProvider(
            init_blocks=1, min_blocks=1, max_blocks=1, worker_init=worker_init
        ),
    )
    return one_block_config(htex, run_dir, log_level)


def driver_python_lines() -> list[str]:
    """Shell lines that give workers this interpreter's ``bin/`` and ``sys.path``,
    so that they run the driver's Python and import what it imports."""
    bindir = os.path.dirname(sys.executable)
    paths = [p or os.getcwd() for p in sys.path]
    return [
        f'export PATH={shlex.quote(bindir)}:"$PATH"',
        f"export PYTHONPATH={shlex.quote(os.pathsep.join(dict.fromkeys(paths)))}",
    ]


def interchange_command(tmpdir: str | None = None) -> list[str]:
    """The interchange of this interpreter's venv, used or not activated; with
    ``tmpdir`` as its ``TMPDIR``, so that what a killed interchange leaves there
    (its multiprocessing ``pymp-*`` directory) goes with the backend's temp dir."""
    bindir = os.path.dirname(sys.executable)
    command = [sys.executable, os.path.join(bindir, "interchange.py")]
    return command if tmpdir is None else ["env", f"TMPDIR={tmpdir}", *command]


def one_block_config(
    htex: HighThroughputExecutor, run_dir: str, log_level: int
) -> Config:
    """One executor whose one block is submitted on the first strategy tick (0.2 s,
    not Parsl's 5 s) and never replaced: no autoscaling, and on a batch system no
    new job after a walltime, which would silently start the work over."""
    return Config(
        executors=[htex],
        run_dir=run_dir,
        strategy="none",
        strategy_period=0.2,
        initialize_logging=QuietFileLogging(log_level),
        usage_tracking=0,
    )


def fix_path(executors: Iterable[ParslExecutor]) -> None:
    """HTEX finds its programs on PATH; a venv used without activation lacks them."""
    if not any(isinstance(e, HighThroughputExecutor) for e in executors):
        return
    if shutil.which("process_worker_pool.py") is not None:
        return
    bindir = os.path.dirname(sys.executable)
    if os.path.exists(os.path.join(bindir, "process_worker_pool.py")):
        os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
