"""A real Slurm cluster of emulated nodes, each in a network namespace of its own.

The cluster the HPC tests run on, and that ``python tests/hpc/slurm.py up`` brings
up by hand for benchmarks or a look around.  Debian's ``slurm-wlm`` and
``munge``, no systemd: one ``munged``, one ``slurmctld`` on a "login node" and one
``slurmd`` per compute node.  The login node and every compute node is a network
namespace with one interface, ``eth0``, on a private bridge that lives in a
namespace of its own, so:

* nothing listens outside these namespaces (the root namespace gets no address,
  and no namespace has a route out);
* a compute node cannot reach the login node at 127.0.0.1, exactly as on a real
  cluster, so a runtime that advertises a loopback address to its workers fails
  here as it would there;
* the driver runs on the login node (``cluster.popen([...])``), as a user's does.

Every file (config, state, spool, logs, munge key and socket) lives in one
directory that :meth:`SlurmCluster.stop` removes, after killing whatever is
still running inside the namespaces and deleting them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

__all__ = ["PARTITION", "SlurmCluster", "missing"]

PARTITION = "debug"
_BIN = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "ip", "nsenter")


def missing() -> str | None:
    """Why this machine cannot run the cluster, or None."""
    absent = [b for b in _BIN if shutil.which(b) is None]
    if absent:
        return (
            f"{', '.join(absent)} not found: install Debian's slurm-wlm and munge "
            "(ci/setup.sh does: apt-get install slurm-wlm munge iproute2 util-linux)"
        )
    if os.geteuid() != 0:
        return "the Slurm test cluster needs root (network namespaces, slurmd)"
    return None


def _run(*argv: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, check=True, capture_output=True, text=True, **kw)


class SlurmCluster:
    """``nodes`` compute nodes of ``cpus`` CPUs each in partition ``debug``.

    ``name`` keeps the namespaces of two clusters on one machine apart; the
    addresses are ``10.251.0.1`` (login) and ``10.251.0.2...`` (nodes) inside
    every cluster, which never see each other.
    """

    def __init__(
        self, *, nodes: int = 3, cpus: int = 2, name: str | None = None
    ) -> None:
        self.nodes = [f"n{i}" for i in range(1, nodes + 1)]
        self.cpus = cpus
        self.name = name or f"af{os.getpid()}"
        self.login_address = "10.251.0.1"
        self.addresses = {n: f"10.251.0.{i + 2}" for i, n in enumerate(self.nodes)}
        self.dir = Path(tempfile.mkdtemp(prefix="af-slurm-"))
        self.conf = self.dir / "slurm.conf"
        self._namespaces: list[str] = []
        self._daemons: list[Path] = []  # pid files

    # -- namespaces ------------------------------------------------------------------
    def netns(self, node: str) -> str:
        return f"{self.name}-{node}"

    def _bridge(self) -> None:
        br = self.netns("br")
        _run("ip", "netns", "add", br)
        self._namespaces.append(br)
        _run("ip", "-n", br, "link", "add", "br0", "type", "bridge")
        _run("ip", "-n", br, "link", "set", "br0", "up")
        for i, (node, addr) in enumerate(
            [("login", self.login_address), *self.addresses.items()]
        ):
            ns = self.netns(node)
            _run("ip", "netns", "add", ns)
            self._namespaces.append(ns)
            port = f"p{i}"
            _run(
                "ip", "-n", ns, "link", "add", "eth0", "type", "veth",
                "peer", "name", port, "netns", br,
            )  # fmt: skip
            _run("ip", "-n", br, "link", "set", port, "master", "br0", "up")
            _run("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
            _run("ip", "-n", ns, "link", "set", "eth0", "up")
            _run("ip", "-n", ns, "link", "set", "lo", "up")

    def nsenter(self, node: str = "login") -> list[str]:
        """The command prefix that runs a program on ``node``.

        ``nsenter``, not ``ip netns exec``: the latter remounts /sys, and slurmd
        then fails to initialise its cgroup plugin.
        """
        return ["nsenter", f"--net=/var/run/netns/{self.netns(node)}", "--"]

    # -- environment -----------------------------------------------------------------
    @property
    def env(self) -> dict[str, str]:
        """The environment of a user on the login node: Slurm's tools find this
        cluster, and this interpreter's ``bin/`` comes first on PATH."""
        env = dict(os.environ)
        bindir = os.path.dirname(sys.executable)
        env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
        env["SLURM_CONF"] = str(self.conf)
        return env

    def popen(self, argv: Sequence[str], **kw: Any) -> subprocess.Popen[str]:
        """Start ``argv`` on the login node, in a session of its own.

        It runs in the cluster's directory unless told otherwise, so that what
        Slurm's tools leave in their working directory (``slurm-N.out``) goes
        with the cluster, not into the caller's."""
        kw.setdefault("env", self.env)
        kw.setdefault("cwd", str(self.dir))
        kw.setdefault("text", True)
        return subprocess.Popen([*self.nsenter(), *argv], start_new_session=True, **kw)

    def run(
        self, argv: Sequence[str], timeout: float = 60, **kw: Any
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` on the login node and wait for it (killed on timeout)."""
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.PIPE)
        proc = self.popen(argv, **kw)
        try:
            out, err = proc.communicate(timeout=timeout)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    def jobs(self) -> list[dict[str, str]]:
        """Every job Slurm still knows of that is not finished."""
        res = self.run(["squeue", "-h", "-o", "%i|%j|%T|%R|%D|%P|%l"], timeout=30)
        keys = ("id", "name", "state", "reason", "nodes", "partition", "timelimit")
        return [
            dict(zip(keys, line.split("|"), strict=True))
            for line in res.stdout.splitlines()
            if line.strip()
        ]

    def scontrol_job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (finished jobs stay for MinJobAge)."""
        res = self.run(["scontrol", "-o", "show", "job", job_id], timeout=30)
        out: dict[str, str] = {}
        for word in res.stdout.split():
            key, _, value = word.partition("=")
            out.setdefault(key, value)
        return out

    def wait_no_jobs(self, timeout: float) -> list[dict[str, str]]:
        """Wait until the queue is empty; the jobs left when ``timeout`` ran out."""
        deadline = time.monotonic() + timeout
        while True:
            jobs = [j for j in self.jobs() if j["state"] != "COMPLETED"]
            if not jobs or time.monotonic() > deadline:
                return jobs
            time.sleep(0.25)

    # -- start and stop --------------------------------------------------------------
    def _write_conf(self) -> None:
        d = self.dir
        node_lines = [
            f"NodeName={n} NodeHostname={n} NodeAddr={a} CPUs={self.cpus} "
            "RealMemory=4000 State=UNKNOWN"
            for n, a in self.addresses.items()
        ]
        # slurmctld refuses to start unless SlurmctldHost names this machine
        self.conf.write_text(
            "\n".join(
                [
                    f"ClusterName={self.name}",
                    f"SlurmctldHost={socket.gethostname()}({self.login_address})",
                    "SlurmUser=root",
                    "SlurmdUser=root",
                    "AuthType=auth/munge",
                    "CredType=cred/munge",
                    f"AuthInfo=socket={d}/munge.sock",
                    "SlurmctldPort=6817",
                    "SlurmdPort=6818",
                    f"StateSaveLocation={d}/state",
                    f"SlurmdSpoolDir={d}/spool/%n",
                    f"SlurmctldPidFile={d}/slurmctld.pid",
                    f"SlurmdPidFile={d}/slurmd-%n.pid",
                    f"SlurmctldLogFile={d}/slurmctld.log",
                    f"SlurmdLogFile={d}/slurmd-%n.log",
                    "ProctrackType=proctrack/linuxproc",
                    "TaskPlugin=task/none",
                    "JobAcctGatherType=jobacct_gather/none",
                    "AccountingStorageType=accounting_storage/none",
                    "SelectType=select/cons_tres",
                    "SelectTypeParameters=CR_Core",
                    "ReturnToService=2",
                    "SchedulerParameters=sched_interval=1",
                    "SlurmdParameters=config_overrides",
                    "MpiDefault=none",
                    "KillWait=2",
                    "OverTimeLimit=0",
                    "MinJobAge=300",
                    f"TaskProlog={d}/task_prolog",
                    "InactiveLimit=0",
                    *node_lines,
                    f"PartitionName={PARTITION} Nodes=ALL Default=YES "
                    "MaxTime=INFINITE State=UP",
                    "",
                ]
            )
        )

    def _task_prolog(self) -> None:
        """The nodes' local temp dir, as a site gives each job one: Slurm's own
        default is /tmp, which a job started without the login node's
        ``TMPDIR`` (radical.pilot's, through PSI/J) would otherwise write to."""
        script = self.dir / "task_prolog"
        script.write_text(
            "#!/bin/sh\n"
            f'case "${{TMPDIR:-/tmp}}" in /tmp|/tmp/) '
            f'echo "export TMPDIR={self.dir}/tmp";; esac\n'
        )
        script.chmod(0o755)

    def _munge(self) -> None:
        d = self.dir
        key = d / "munge.key"
        _run("mungekey", "--create", f"--keyfile={key}")
        key.chmod(0o600)
        pid = d / "munged.pid"
        _run(
            "munged", "--force", f"--key-file={key}", f"--socket={d}/munge.sock",
            f"--pid-file={pid}", f"--log-file={d}/munged.log",
            f"--seed-file={d}/munged.seed",
        )  # fmt: skip
        self._daemons.append(pid)

    def start(self, timeout: float = 30) -> SlurmCluster:
        try:
            for sub in ("state", "spool", "tmp"):
                (self.dir / sub).mkdir()
            self._task_prolog()
            self._write_conf()
            self._bridge()
            self._munge()
            env = self.env
            _run(*self.nsenter(), "slurmctld", "-f", str(self.conf), env=env)
            self._daemons.append(self.dir / "slurmctld.pid")
            for node in self.nodes:
                (self.dir / "spool" / node).mkdir()
                _run(
                    *self.nsenter(node), "slurmd", "-f", str(self.conf), "-N", node,
                    env=env,
                )  # fmt: skip
                self._daemons.append(self.dir / f"slurmd-{node}.pid")
            self._wait_idle(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            res = self.run(["sinfo", "-h", "-N", "-o", "%N %t"], timeout=15)
            states = dict(line.split() for line in res.stdout.splitlines())
            if res.returncode == 0 and all(states.get(n) == "idle" for n in self.nodes):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"Slurm nodes not idle after {timeout:.0f} s: {states} "
                    f"{res.stderr.strip()}\n{self.log_tail()}"
                )
            time.sleep(0.1)

    def log_tail(self, lines: int = 15) -> str:
        out = []
        for log in sorted(self.dir.glob("*.log")):
            tail = log.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {log.name}\n" + "\n".join(tail))
        return "\n".join(out)

    def stop(self) -> None:
        """Cancel every job, stop the daemons, empty and delete the namespaces."""
        if self.conf.exists() and self._daemons:
            with contextlib.suppress(Exception):
                self.run(["scancel", "--full", "--user=root"], timeout=15)
        for pid_file in reversed(self._daemons):
            _terminate(pid_file)
        self._daemons.clear()
        for ns in reversed(self._namespaces):
            _empty_namespace(ns)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self._namespaces.clear()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> SlurmCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _pids(pid_file: Path) -> Iterator[int]:
    with contextlib.suppress(OSError, ValueError):
        yield int(pid_file.read_text().split()[0])


def _terminate(pid_file: Path, grace: float = 5) -> None:
    for pid in _pids(pid_file):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie child of ours counts as gone
    with contextlib.suppress(OSError):
        if Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z":
            return False
    return True


def _empty_namespace(ns: str) -> None:
    """Kill every process still in ``ns``: deleting a namespace does not."""
    for _ in range(50):
        res = subprocess.run(
            ["ip", "netns", "pids", ns], capture_output=True, text=True
        )
        pids = [int(p) for p in res.stdout.split() if _alive(int(p))]
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)


def main(argv: Sequence[str]) -> int:
    """``up``: a cluster until Ctrl-C, for a look around; ``run -- CMD``: CMD on
    the login node of a fresh cluster (a benchmark, a workflow), then stop."""
    if (
        not argv
        or argv[0] not in ("up", "run")
        or (argv[0] == "run") != (len(argv) > 2 and argv[1] == "--")
    ):
        print(
            "usage: python tests/hpc/slurm.py up | run -- COMMAND...", file=sys.stderr
        )
        return 2
    why = missing()
    if why:
        print(why, file=sys.stderr)
        return 1
    with SlurmCluster() as cluster:
        if argv[0] == "run":
            proc = cluster.popen(argv[2:], cwd=os.getcwd())
            try:
                return proc.wait()
            except KeyboardInterrupt:
                os.killpg(proc.pid, signal.SIGINT)
                return proc.wait()
        login = " ".join(cluster.nsenter())
        print(
            f"Slurm is up: {len(cluster.nodes)} nodes in partition {PARTITION!r}.\n"
            f"In another shell, as root:\n  export SLURM_CONF={cluster.conf}\n"
            f"  {login} bash    # a shell on the login node\n"
            "Ctrl-C stops the cluster and removes everything.",
            flush=True,
        )
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
