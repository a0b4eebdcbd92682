"""radical.pilot: HPC pilot jobs, with the docs page's one-line constructor.

radical.pilot is built for batch systems: a session plus an active pilot takes
20-80 s and some thirty processes, most API calls block, and its processes can
outlive the driver.  The adapter is split along those lines:

``config``
    the page's keys -> a PilotDescription, checked before anything starts;
``runtime``
    :class:`RadicalRuntime`, one session, pilot and raptor, started in a
    background thread and shareable between backends;
``batch``
    ``'resource': 'slurm'``: the pilot as a job of this host's Slurm cluster
    (its resource config written, asked for, named, watched, cancelled);
``dispatch``
    the thread that submits and cancels in bulk, and the routing of
    radical.pilot's completion callbacks;
``worker``
    function tasks in raptor workers, with exceptions that survive the trip;
``backend``
    :class:`RadicalExecutionBackend`, the protocol adapter itself;
``cleanup`` and ``reaper``
    a shutdown bounded in time, and a watchdog process that removes every
    radical.pilot process and file if the driver dies.
"""

from __future__ import annotations

from .backend import RadicalExecutionBackend
from .config import pilot_description
from .runtime import RadicalRuntime
from .worker import AsyncflowWorker

__all__ = [
    "AsyncflowWorker",
    "RadicalExecutionBackend",
    "RadicalRuntime",
    "pilot_description",
]
