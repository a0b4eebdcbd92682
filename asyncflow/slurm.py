"""What every runtime needs from Slurm, done once and the same way everywhere.

* :func:`preflight` asks Slurm whether it could ever run an allocation's job
  (``sbatch --test-only``), so an unknown partition or more nodes than exist
  fails at once with the scheduler's own reason instead of a job that never
  starts;
* :func:`driver_address` finds the address compute nodes reach this process at:
  a runtime that advertised 127.0.0.1, fine on a laptop, would leave every
  worker dialling its own loopback;
* :func:`node_tmpdir` gives a job's processes a ``TMPDIR`` of the backend's
  own under the node's, which shutdown removes wherever the driver sees it;
* :class:`BatchJobs` watches a backend's jobs, reports a job waiting in the
  queue, notices one that ended under the backend (walltime, node failure), and
  cancels them all at shutdown, or, through a guard process, when the driver
  is killed.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
import weakref
from collections.abc import Callable
from dataclasses import dataclass

from .errors import BackendStartError
from .hpc import Allocation

__all__ = ["BatchJobs", "Job", "driver_address", "node_tmpdir", "preflight"]


def _slurm_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise BackendStartError(
            f"'resource': 'slurm' needs Slurm's {name} on PATH, and it is not "
            "there: run on a login node of the cluster (or load its Slurm module)"
        )
    return path


def preflight(alloc: Allocation, who: str) -> None:
    """Fail now, with Slurm's reason, if it could never run ``alloc``'s job.

    ``sbatch --test-only`` asks the controller without queueing anything: an
    unknown partition or account, more nodes than the partition has, GPUs on a
    cluster without any, or a walltime above the partition's limit.
    """
    sbatch = _slurm_tool("sbatch")
    res = subprocess.run(
        [sbatch, "--test-only", *alloc.sbatch_options(), "--wrap", "true"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if res.returncode != 0:
        reason = " ".join(
            line.removeprefix("sbatch: error: ").strip()
            for line in res.stderr.splitlines()
            if line.strip()
        )
        raise BackendStartError(
            f"{who}: Slurm can never run the requested allocation "
            f"({' '.join(alloc.sbatch_options())}): {reason or 'no reason given'}; "
            "check the dict's queue, nodes, gpus_per_node and walltime against "
            "`sinfo`"
        )


_CTLD_HOST = re.compile(r"^SlurmctldHost\[0\]\s*=\s*(\S+)", re.M)


def _controller_host() -> str:
    res = subprocess.run(
        [_slurm_tool("scontrol"), "show", "config"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    match = _CTLD_HOST.search(res.stdout)
    if res.returncode != 0 or match is None:
        raise BackendStartError(
            "cannot read the Slurm controller's address from `scontrol show "
            f"config`: {res.stderr.strip() or 'no SlurmctldHost line'}"
        )
    name, _, addr = match.group(1).partition("(")
    return addr.rstrip(")") or name


def driver_address() -> str:
    """The address of this host on the network its Slurm nodes share.

    The route to the Slurm controller goes over that network (the nodes reach
    the controller, and the controller usually runs on or next to the login
    node), so the local end of a UDP socket connected there is an address the
    nodes can reach.  Connecting a UDP socket sends nothing.
    """
    host = _controller_host()
    try:
        target = socket.getaddrinfo(host, 6817, type=socket.SOCK_DGRAM)[0][4][0]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.connect((target, 6817))
            return str(sock.getsockname()[0])
    except OSError as exc:
        raise BackendStartError(
            f"cannot find this host's address toward the Slurm controller {host}: "
            f"{exc}; pass the address workers should use explicitly"
        ) from exc


def node_tmpdir(scratch: str) -> str:
    """The job-script line that moves the job's ``TMPDIR`` into a folder named
    like the driver's ``scratch`` dir, under the node's own ``TMPDIR``.

    A runtime's worker killed with SIGKILL (by the OOM killer, a failing node,
    Slurm at walltime) leaves its files there: Dask's scratch space and lock
    files, Parsl's ``pymp-*`` folders.  Under one folder of the backend's own
    they stay away from other users' files, and where the nodes share the
    driver's temp dir, removing ``scratch`` at shutdown removes them.
    """
    name = shlex.quote(os.path.basename(scratch))
    return f'export TMPDIR="${{TMPDIR:-/tmp}}"/{name} && mkdir -p "$TMPDIR"'


#: Slurm job states after which the job's nodes are gone
_ENDED = {
    "BOOT_FAIL": "failed to boot",
    "CANCELLED": "was cancelled outside asyncflow",
    "DEADLINE": "reached its deadline",
    "FAILED": "failed",
    "NODE_FAIL": "lost a node",
    "OUT_OF_MEMORY": "ran out of memory",
    "PREEMPTED": "was preempted",
    "TIMEOUT": "reached its walltime",
    "COMPLETED": "ended",
}
_SQUEUE_FORMAT = "%i|%j|%T|%r|%l|%N"


@dataclass(frozen=True)
class Job:
    """One line of ``squeue``: a batch job of this backend."""

    id: str
    name: str
    state: str  # Slurm's: PENDING, RUNNING, COMPLETING, TIMEOUT, ...
    reason: str
    time_limit: str
    nodelist: str

    def describe(self) -> str:
        if self.state == "PENDING":
            return f"Slurm job {self.id} is waiting in the queue ({self.reason})"
        if self.state in _ENDED:
            why = _ENDED[self.state]
            if self.state == "TIMEOUT":
                why += f" of {self.time_limit}"
            return f"Slurm job {self.id} {why}"
        return f"Slurm job {self.id} is {self.state.lower()} on {self.nodelist}"


_GUARD = """
import subprocess, sys
sys.stdin.read()  # EOF: the driver closed its end, or died
prefix = sys.argv[1]
out = subprocess.run(["squeue", "-h", "--me", "-o", "%i %j"],
                     capture_output=True, text=True).stdout
ids = [i for i, _, name in (l.partition(" ") for l in out.splitlines())
       if prefix in name]
if ids:
    subprocess.run(["scancel", *ids], capture_output=True)
"""


class BatchJobs:
    """The Slurm jobs of one backend: watched, reported, and never left behind.

    Every job the backend submits carries :attr:`prefix` in its name; that is
    how they are found, whichever runtime submitted them.  While running, a
    thread reads ``squeue`` every ``interval`` seconds (Slurm has no push
    notification; Parsl and dask-jobqueue poll it too) and reports each change
    to ``report(state, detail)`` (``"queued"``, ``"running"``, ``"ended"``), so
    a job waiting in the queue shows as waiting rather than as a hang.  A job
    that ends while the backend still needs it (walltime, node failure, someone
    else's ``scancel``) is passed to ``lost(message)``.

    :meth:`close` cancels every job and waits until Slurm says they are gone.
    A guard process, started by :meth:`start`, does the same if the driver is
    killed (SIGKILL included): it holds the read end of a pipe only this
    process writes to, and cancels the jobs at end of file.
    """

    def __init__(
        self,
        who: str,
        *,
        report: Callable[[str, str], None] | None = None,
        lost: Callable[[str], None] | None = None,
        interval: float = 2.0,
    ) -> None:
        self.who = who
        self.prefix = f"asyncflow-{uuid.uuid4().hex[:10]}"
        self._report = report
        self._lost = lost
        self._interval = interval
        self._seen: dict[str, str] = {}  # job id -> what was last reported
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._guard: subprocess.Popen[bytes] | None = None
        self._closed = False

    def start(self) -> None:
        """Start the guard and the watch; call before the first job is submitted."""
        _slurm_tool("squeue")
        self._guard = subprocess.Popen(
            [sys.executable, "-c", _GUARD, self.prefix],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C to the driver's group spares it
        )
        _not_in_forks(self)
        self._thread = threading.Thread(
            target=self._watch, name="asyncflow-slurm-watch", daemon=True
        )
        self._thread.start()

    def jobs(self) -> list[Job]:
        """This backend's jobs as ``squeue`` lists them, finished ones included."""
        res = subprocess.run(
            [_slurm_tool("squeue"), "-h", "--me", "-t", "all", "-o", _SQUEUE_FORMAT],
            capture_output=True,
            text=True,
            timeout=60,
        )
        jobs = []
        for line in res.stdout.splitlines():
            fields = line.split("|")
            if len(fields) == 6 and self.prefix in fields[1]:
                jobs.append(Job(*fields))
        return jobs

    def _watch(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                jobs = self.jobs()
            except (OSError, subprocess.SubprocessError):
                continue
            for job in jobs:
                self._changed(job)

    def _changed(self, job: Job) -> None:
        state = (
            "queued"
            if job.state == "PENDING"
            else "ended"
            if job.state in _ENDED
            else "running"
        )
        detail = job.describe()
        if self._seen.get(job.id) == detail or self._stop.is_set():
            return
        self._seen[job.id] = detail
        if self._report is not None:
            self._report(state, detail)
        if state == "ended" and self._lost is not None:
            self._lost(f"{job.describe()}; its workers are gone")

    def close(self, timeout: float = 30.0) -> list[Job]:
        """Cancel every job, wait until none is left; the jobs still there then."""
        if self._closed:
            return []
        self._closed = True
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self._interval + 65)
        left = self._cancel_all(timeout)
        self._end_guard()
        return left

    def _cancel_all(self, timeout: float) -> list[Job]:
        """``scancel`` until no job is left or ``timeout`` passes; what is left.

        Slurm being unreachable ends the wait: the guard still cancels the
        jobs once the driver's pipe closes."""
        left: list[Job] = []
        deadline = time.monotonic() + timeout
        with contextlib.suppress(
            BackendStartError, OSError, subprocess.SubprocessError
        ):
            while True:
                left = [j for j in self.jobs() if j.state not in _ENDED]
                if not left or time.monotonic() > deadline:
                    break
                subprocess.run(
                    [_slurm_tool("scancel"), *(j.id for j in left)],
                    capture_output=True,
                    timeout=60,
                )
                time.sleep(0.2)
        return left

    def _end_guard(self) -> None:
        """Close the guard's pipe, which it reads as the driver ending."""
        if self._guard is None:
            return
        with contextlib.suppress(OSError):
            assert self._guard.stdin is not None
            self._guard.stdin.close()
        try:
            self._guard.wait(15)
        except subprocess.TimeoutExpired:
            self._guard.kill()
            self._guard.wait()


def _not_in_forks(jobs: BatchJobs) -> None:
    """Keep the guard's pipe out of the processes forked from the driver.

    The guard cancels the jobs at end of file, that is once every process
    holding the pipe's write end has exited.  Runtimes fork helpers from the
    driver (radical.pilot's session proxy workers) which would hold it on: the
    guard then waited for them after a SIGKILL, and ``close()`` waited for the
    guard.  In a forked child the write end is pointed at /dev/null.
    """
    ref = weakref.ref(jobs)

    def in_child() -> None:
        guard = getattr(ref(), "_guard", None)
        stdin = getattr(guard, "stdin", None)
        if stdin is None or stdin.closed:
            return
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, stdin.fileno())
        os.close(null)

    os.register_at_fork(after_in_child=in_child)
