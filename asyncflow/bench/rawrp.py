"""Raw radical.pilot, the baseline for the ``radical`` backend.

It builds what the adapter builds, with radical.pilot's own API and nothing of
asyncflow's: a Session, a PilotManager and a TaskManager, the same
PilotDescription (``pilot_description``, so both sides get the same cores), a
raptor master with one ``DefaultWorker`` for function tasks, and the recipe's
deterministic close.  Tasks go in bulk: ``TaskManager.submit_tasks`` for
executables, the raptor's ``submit_tasks`` for functions, one fresh
TaskDescription each.  radical.pilot has no data dependencies, so a dependent
task's upstream results are waited for in the driver, as a raw user would.

Two things a raw user must do differently from the adapter, and this module does:

- raptor's ``DefaultWorker`` forks per task and dill ships a module-level
  function by reference, so every task would import its module (here the whole
  of asyncflow, about 0.2 s).  A user's script defines its functions in
  ``__main__``, which dill ships by value; :func:`by_value` gives the task
  bodies that shape.
- raptor returns results through msgpack, which cannot carry a numpy array: the
  worker logs the error and the task never completes.  So the map-reduce
  workload has no raw baseline here (see :meth:`RadicalRaw.skip`).

``RadicalRaw(hpc)``, with the page's ``'resource': 'slurm'`` dict, submits the
pilot through Slurm.  radical.pilot reaches a batch system only through a
resource config, which a raw user writes by hand once per cluster: here it is
the one the adapter writes (:func:`asyncflow.adapters.radical.batch.config_dir`,
found through ``RADICAL_CONFIG_USER_DIR``), with what a user exports on the
login node: the interface the compute nodes reach this host on
(``RADICAL_DEFAULT_IFACE``) and a job name (``SBATCH_JOB_NAME``: radical.pilot's
PSI/J launcher drops the PilotDescription's), so that shutdown can check that
Slurm lists no job of ours any more.  The sandbox goes under the current
directory, which the nodes share.  The measured path is radical.pilot's own API.
"""

from __future__ import annotations

import atexit
import builtins
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from .raw import Raw

if TYPE_CHECKING:
    from ..hpc import Allocation

START_TIMEOUT = 600.0
#: seconds Slurm gets to list the pilot's job no more after the close
SLURM_GONE_TIMEOUT = 30.0
#: a bulk of tasks gets this long, plus PER_TASK each, before it counts as hung;
#: generous: on a loaded 2-core machine raptor's workers took over 2 min to start
WAIT_BASE, PER_TASK = 600.0, 2.0


def by_value(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A copy of ``fn`` that dill pickles by value, as it does a script's own
    functions: module ``__main__``, and only the constants it refers to."""
    glb: dict[str, Any] = {"__builtins__": builtins}
    for name in fn.__code__.co_names:
        value = fn.__globals__.get(name)
        if isinstance(value, int | float | str):
            glb[name] = value
    copy = types.FunctionType(fn.__code__, glb, fn.__name__, fn.__defaults__)
    copy.__module__ = "__main__"
    copy.__qualname__ = fn.__qualname__
    return copy


class RadicalRaw(Raw):
    name = "radical.pilot submit_tasks"

    @classmethod
    def for_allocation(cls, alloc: Allocation, hpc: dict[str, Any]) -> Raw | None:
        return cls(hpc)  # the adapter's own reading of the dict, as on its side

    def __init__(self, resources: Mapping[str, Any] | None = None) -> None:
        from asyncflow.adapters.radical.config import plan

        # the adapter's plan of the pilot, so that both sides get the same cores
        self.layout = plan(resources or {"resource": "local.localhost"})
        alloc = self.layout.allocation
        #: the Slurm job's name (radical.pilot's PSI/J launcher drops job_name)
        self.job_name = f"asyncflow-bench-rp-{os.getpid()}" if alloc else None
        #: what shutdown had to clean up after radical.pilot's own close
        self.notes: list[str] = []
        self.base = os.path.realpath(
            tempfile.mkdtemp(
                prefix="asyncflow-bench-rp-",
                # a Slurm pilot's sandbox must be on the nodes' shared filesystem
                dir=os.getcwd() if alloc else None,
            )
        )
        atexit.register(shutil.rmtree, self.base, True)
        os.makedirs(os.path.join(self.base, "tmp"))
        # the recipe: set before radical.pilot starts its processes
        bindir = os.path.dirname(sys.executable)
        env = {
            "PATH": bindir + os.pathsep + os.environ.get("PATH", ""),
            "VIRTUAL_ENV": sys.prefix,
            "RADICAL_PROFILE": "False",
            "RADICAL_REPORT": "False",
            "RADICAL_BASE": self.base,
            "RADICAL_PILOT_BASE": self.base,
            "TMPDIR": os.path.join(self.base, "tmp"),
        }
        self.iface = None
        if alloc is not None:
            from asyncflow.adapters.radical import batch
            from asyncflow.slurm import driver_address

            # the resource config a raw user writes for the cluster, by hand
            env["RADICAL_CONFIG_USER_DIR"] = batch.config_dir(self.base, alloc)
            env["SBATCH_JOB_NAME"] = str(self.job_name)
            self.iface = batch.interface_of(driver_address())
            if self.iface:
                env["RADICAL_DEFAULT_IFACE"] = self.iface
        self._saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        self.session: Any = None
        self.pilot: Any = None
        self._fns: dict[Any, Callable[..., Any]] = {}
        try:
            self._start()
        except BaseException:
            self.shutdown()
            raise

    def _start(self) -> None:
        import radical.pilot as rp

        from asyncflow.adapters.radical.batch import advertised_interface

        self.rp = rp
        lay = self.layout
        pd = dict(lay.description)
        pd["sandbox"] = self.base
        # radical.utils may have read RADICAL_DEFAULT_IFACE already (at import)
        with advertised_interface(self.iface):
            self.session = rp.Session(
                cfg={"base": self.base, "client_sandbox": self.base}
            )
            pmgr = rp.PilotManager(session=self.session)
            self.tmgr = rp.TaskManager(session=self.session)
        self.pilot = pmgr.submit_pilots(rp.PilotDescription(pd))
        self.tmgr.add_pilots(self.pilot)
        master = rp.TaskDescription(
            {"mode": rp.RAPTOR_MASTER, "ranks": 1, "cores_per_rank": 1}
        )
        self.raptor = self.pilot.submit_raptors([master])[0]
        # the adapter's raptor workers on this pilot: as many, as big
        worker = {
            "mode": rp.RAPTOR_WORKER,
            "ranks": 1,
            "cores_per_rank": lay.worker_cores,
            "raptor_class": "DefaultWorker",
        }
        self.raptor.submit_workers(
            [rp.TaskDescription(worker) for _ in range(lay.n_workers)]
        )
        self.pilot.wait([rp.PMGR_ACTIVE, *rp.FINAL], timeout=START_TIMEOUT)
        if self.pilot.state != rp.PMGR_ACTIVE:
            raise RuntimeError(f"raw radical.pilot: the pilot is {self.pilot.state}")

    # -- tasks ---------------------------------------------------------------------
    def submit(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self.map(fn, [args])[0]

    def map(self, fn: Callable[..., Any], arglists: list[tuple[Any, ...]]) -> list[Any]:
        rp = self.rp
        upstream = [a for args in arglists for a in args if isinstance(a, rp.Task)]
        if upstream:  # no data dependencies in radical.pilot: wait in the driver
            self.gather(upstream)
        remote = self._fns.get(fn)
        if remote is None:
            remote = self._fns[fn] = by_value(fn)
        tds = [
            rp.TaskDescription(
                {
                    "mode": rp.TASK_FUNCTION,
                    "function": rp.PythonTask(
                        remote,
                        tuple(
                            a.return_value if isinstance(a, rp.Task) else a
                            for a in args
                        ),
                        {},
                    ),
                }
            )
            for args in arglists
        ]
        return list(self.raptor.submit_tasks(tds))

    def executables(
        self, argv: list[str], n: int, as_function: Callable[[], Any]
    ) -> list[Any]:
        rp = self.rp
        tds = [
            rp.TaskDescription({"executable": argv[0], "arguments": argv[1:]})
            for _ in range(n)
        ]
        return list(self.tmgr.submit_tasks(tds))

    def gather(self, handles: list[Any]) -> list[Any]:
        rp = self.rp
        pending = [t.uid for t in handles if t.state not in rp.FINAL]
        if pending:
            timeout = WAIT_BASE + PER_TASK * len(pending)
            self.tmgr.wait_tasks(uids=pending, state=rp.FINAL, timeout=timeout)
        bad = [t for t in handles if t.state != rp.DONE]
        if bad:
            raise RuntimeError(self._failed(bad, len(handles)))
        return [
            t.return_value if t.description.get("mode") == rp.TASK_FUNCTION else 0
            for t in handles
        ]

    def _failed(self, bad: list[Any], total: int) -> str:
        """How many tasks did not succeed, and the first one's state and error."""
        t = bad[0]
        hung = t.state not in self.rp.FINAL
        return (
            f"raw radical.pilot: {len(bad)} of {total} tasks "
            f"{'did not finish in time' if hung else 'failed'}; {t.uid} is "
            f"{t.state}: {t.exception or t.stderr or 'no detail'}"
        )

    def skip(self, workload: str) -> str | None:
        if workload == "mapreduce":
            return (
                "raptor returns results through msgpack, which cannot carry a "
                "numpy array (the task never completes)"
            )
        return None

    # -- close -----------------------------------------------------------------------
    def shutdown(self) -> None:
        """The recipe's deterministic close, then whatever still runs in our
        directory or Slurm's queue (noted: radical.pilot left it), then the
        directory."""
        try:
            if self.pilot is not None:
                with contextlib.suppress(Exception):
                    self.pilot.cancel()
                    self.pilot.wait(state=self.rp.FINAL, timeout=30)
            if self.session is not None:
                self.session.close(download=False, terminate=False)
        finally:
            self.pilot = self.session = None
            killed = kill_under(self.base)
            if killed:
                self.notes.append(
                    f"{killed} radical.pilot process(es) still ran after the "
                    "session closed; killed"
                )
            if self.job_name:
                left = cancel_jobs(self.job_name)
                if left:
                    self.notes.append(
                        f"Slurm job(s) of the pilot outlived the session's close: "
                        f"{', '.join(left)}; cancelled"
                    )
            for k, v in self._saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            shutil.rmtree(self.base, ignore_errors=True)


def _squeue(name: str) -> dict[str, str]:
    """Slurm's jobs called ``name``: id -> state."""
    res = subprocess.run(
        ["squeue", "-h", "-n", name, "-o", "%i %T"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    return dict(line.split()[:2] for line in res.stdout.split("\n") if line.strip())


def cancel_jobs(name: str, timeout: float = SLURM_GONE_TIMEOUT) -> list[str]:
    """Wait until Slurm lists no job called ``name``; one still queued or
    running (which radical.pilot's cancel should have ended) is cancelled,
    and returned, as is one still listed after ``timeout`` s."""
    try:
        jobs = _squeue(name)
        alive = [f"{i} ({st})" for i, st in jobs.items() if st != "COMPLETING"]
        if alive:
            subprocess.run(["scancel", "-n", name], capture_output=True, timeout=30)
        deadline = time.monotonic() + timeout
        while jobs and time.monotonic() < deadline:
            time.sleep(0.25)
            jobs = _squeue(name)
    except (OSError, subprocess.SubprocessError) as exc:
        return [f"(squeue/scancel failed: {exc})"]
    return alive + [f"{i} still {st} after {timeout:.0f} s" for i, st in jobs.items()]


def kill_under(base: str) -> int:
    """SIGKILL every process working in ``base``, which is ours alone (a fresh
    temp directory): radical.pilot's agent outlives a closed session for a while
    and would otherwise burn a core into the next backend's measurements."""
    killed = 0
    deadline = time.monotonic() + 3
    while os.path.isdir("/proc") and time.monotonic() < deadline:
        pids = _working_in(base)
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
                killed += 1
        time.sleep(0.1)
    return killed


def _working_in(base: str) -> list[int]:
    """The other processes whose working directory is ``base`` or below it."""
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cwd = os.readlink(f"/proc/{entry.name}/cwd")
        except OSError:
            continue
        if cwd == base or cwd.startswith(base + os.sep):
            pids.append(int(entry.name))
    return pids
