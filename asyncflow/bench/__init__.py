"""``asyncflow bench``: the same workloads on every runtime, against each
runtime's own API, measured in the same run.

Users pick a runtime by measuring it on their own workflow, and the figures hold
asyncflow's own overhead to account.  Each backend runs in a fresh subprocess
(see :mod:`.child`); this parent collects its JSON lines, shows progress, prints
tables, writes JSON, CSV, Markdown and PNG plots, and fails loudly (exit 1) if
any run gives a wrong answer, backends disagree, or a backend breaks.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from pathlib import Path
from typing import Any

from ..registry import BATCH, available_backends, batch_names
from .report import (
    COLUMNS,
    ORDER,
    cross_check,
    machine_line,
    markdown,
    startup_rows,
    summarise,
    table_rows,
    targets,
    write_files,
)
from .workloads import WORKLOADS

__all__ = ["main"]

QUICK_SIZES = "100"


def _cpu_busy(seconds: float = 1.0) -> float | None:
    """The fraction of all cores busy over ``seconds``: the background load."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            vals = [int(v) for v in f.readline().split()[1:]]
        idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
        return sum(vals), idle

    try:
        t0, i0 = sample()
        time.sleep(seconds)
        t1, i1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return 1 - (i1 - i0) / (t1 - t0) if t1 > t0 else None


def _machine(argv: Sequence[str]) -> dict[str, Any]:
    mem = cpu = None
    try:
        with open("/proc/meminfo") as f:
            mem = int(f.readline().split()[1]) * 1024
        with open("/proc/cpuinfo") as f:
            cpu = next(
                (
                    ln.split(":", 1)[1].strip()
                    for ln in f
                    if ln.startswith("model name")
                ),
                None,
            )
    except OSError:
        pass
    versions = {s.name: s.version for s in available_backends() if s.installed}
    for dist in ("asyncflow", "numpy"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": shlex.join(["asyncflow", "bench", *argv]),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_bytes": mem,
        "load_before": os.getloadavg(),
        "cpu_busy_before": _cpu_busy(),
        "versions": versions,
    }


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="asyncflow bench", description=__doc__.split("\n\n")[0]
    )
    p.add_argument(
        "--backends",
        default="all",
        help="comma list, or 'all' (every installed backend)",
    )
    p.add_argument("--workloads", default=",".join(WORKLOADS))
    p.add_argument("--sizes", default="1000,10000")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--out", default="bench-out")
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"sizes {QUICK_SIZES} (radical: smaller), one repeat: a smoke test",
    )
    p.add_argument(
        "--hpc",
        metavar="JSON|FILE",
        help=f"run {batch_names()} on a batch cluster with the reference "
        'page\'s allocation dict (e.g. \'{"resource": "slurm", "nodes": 3, '
        "\"cores_per_node\": 2}'); the raw sides use each runtime's own Slurm API",
    )
    p.add_argument(
        "--render",
        action="store_true",
        help="run nothing: redo tables, Markdown and plots from OUT/bench.json",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="cProfile each side's driver thread into OUT/profile-*.pstats "
        "(slows the run: its figures are for finding causes, not for comparing)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=3600,
        help="seconds one backend may take before it is stopped",
    )
    return p.parse_args(argv)


#: benchmark children still running (``--quick`` runs several at once)
_LIVE: set[subprocess.Popen[str]] = set()


def _run_child(
    spec: dict[str, Any], timeout: float, on_record: Any
) -> tuple[int, bool]:
    """Run one backend's child process; (exit code, whether it timed out).

    The child gets its own session, so that on a timeout or Ctrl-C its whole
    process group (runtime workers included) can be stopped: SIGTERM first,
    which the child turns into an orderly shutdown, SIGKILL 60 s later."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "asyncflow.bench.child", json.dumps(spec)],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    _LIVE.add(proc)
    expired = threading.Event()

    def stop() -> None:
        expired.set()
        _signal_group(proc, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            _signal_group(proc, signal.SIGKILL)

    timer = threading.Timer(timeout, stop)
    timer.daemon = True
    timer.start()
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a runtime printing to stdout
            if isinstance(rec, dict) and "kind" in rec:
                on_record(rec)
        return proc.wait(), expired.is_set()
    except BaseException:
        stop()
        raise
    finally:
        timer.cancel()
        _LIVE.discard(proc)


def _signal_group(proc: subprocess.Popen[str], sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # the child's own session: only what it started
    except (ProcessLookupError, PermissionError):
        pass


def _allocation(text: str) -> dict[str, Any]:
    raw = text if text.lstrip().startswith("{") else Path(text).read_text()
    value = json.loads(raw)
    if not isinstance(value, dict):
        raise SystemExit("asyncflow bench: --hpc takes a JSON object")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[2:] if argv is None else argv)
    ns = _parse(argv)
    if ns.quick:
        ns.sizes, ns.repeat = QUICK_SIZES, 1
    status = {s.name: s for s in available_backends()}
    wanted = (
        [n for n in ORDER if n in status] + sorted(n for n in status if n not in ORDER)
        if ns.backends == "all"
        else [b.strip() for b in ns.backends.split(",") if b.strip()]
    )
    workloads = [w.strip() for w in ns.workloads.split(",") if w.strip()]
    unknown = [w for w in workloads if w not in WORKLOADS]
    if unknown:
        print(
            f"unknown workloads {unknown}; choose from {list(WORKLOADS)}",
            file=sys.stderr,
        )
        return 2
    sizes = [int(s) for s in ns.sizes.split(",")]
    hpc = _allocation(ns.hpc) if ns.hpc else None
    if hpc is not None and ns.backends == "all":
        wanted = [n for n in wanted if n in BATCH]
    from rich.console import Console
    from rich.progress import Progress

    console = Console(stderr=True)
    if ns.render:
        return _render(Path(ns.out), console)
    notes: list[str] = []
    backends = []
    for name in wanted:
        s = status.get(name)
        if s is None or not s.installed:
            hint = s.install_hint if s else "unknown backend"
            notes.append(f"{name} skipped: not installed ({hint})")
            console.print(f"[yellow]skipping {name}: not installed ({hint})")
        else:
            backends.append(name)
    runs: dict[str, int] = {}
    for name in backends:
        runs[name] = 0
        capped: dict[str, list[str]] = {}
        for w in workloads:
            these, why = WORKLOADS[w].sizes_for(name, sizes, ns.quick)
            runs[name] += 2 * len(these) * ns.repeat
            if why:
                capped.setdefault(why, []).append(f"{w} at {max(these)}")
        for why, which in capped.items():
            notes.append(f"{name}: sizes capped ({', '.join(which)}): {why}")
            console.print(f"[yellow]{notes[-1]}")
    meta = _machine(argv)
    Path(ns.out).mkdir(parents=True, exist_ok=True)
    records: list[dict[str, Any]] = []
    failures: list[str] = []
    with Progress(console=console, transient=True) as progress:
        bar = progress.add_task("benchmarking", total=sum(runs.values()))

        def run_one(name: str) -> None:
            progress.update(bar, description=f"benchmarking {name}")

            def on_record(rec: dict[str, Any]) -> None:
                rec["backend"] = name
                records.append(rec)
                if rec["kind"] == "run":
                    progress.advance(bar)
                elif rec["kind"] == "error":
                    failures.append(f"{name} {rec['side']}: {rec['text']}")
                    console.print(f"[red]{name} {rec['side']}: {rec['text']}")
                elif rec["kind"] in ("skip", "note"):
                    text = (
                        f"{name} {rec['side']}: {rec.get('workload', '')} {rec['text']}"
                    )
                    notes.append(" ".join(text.split()))
                    console.print(f"[yellow]{notes[-1]}")

            spec = {
                "backend": name,
                "workloads": workloads,
                "sizes": sizes,
                "repeat": ns.repeat,
                "quick": ns.quick,
                "profile": str(Path(ns.out).resolve()) if ns.profile else None,
                "hpc": hpc,
            }
            code, expired = _run_child(spec, ns.timeout, on_record)
            problem = None
            if expired:
                problem = f"{name}: stopped after --timeout {ns.timeout:.0f} s"
            elif code != 0:
                problem = f"{name}: benchmark process exited {code}"
            if problem:
                failures.append(problem)
                console.print(f"[red]{problem}")

        if ns.quick:
            # A smoke test, whose figures are not for comparing: the backends run
            # side by side, so the slowest start-up (radical.pilot's pilots) sets
            # the wall time instead of the sum of them all.
            with ThreadPoolExecutor(max(1, len(backends))) as pool:
                try:
                    list(pool.map(run_one, backends))
                except BaseException:  # Ctrl-C: the children have sessions of their own
                    for proc in list(_LIVE):
                        _signal_group(proc, signal.SIGTERM)
                    raise
        else:
            for name in backends:
                run_one(name)
    loads = [r["load"] for r in records if r["kind"] == "run" and "load" in r]
    meta["load_after"] = os.getloadavg()
    meta["load_max"] = max(loads) if loads else None
    meta["notes"] = notes
    meta["failures"] = failures
    return _finish(Path(ns.out), meta, records, notes, failures, console)


def _render(out: Path, console: Any) -> int:
    """``--render``: the files of an earlier run, from its bench.json."""
    data = json.loads((out / "bench.json").read_text())
    meta, records = data["meta"], data["records"]
    failures = meta.get("failures")
    if failures is None:  # written before failures were kept in meta
        failures = [
            f"{r['backend']} {r['side']}: {r['text']}"
            for r in records
            if r["kind"] == "error"
        ]
    return _finish(out, meta, records, meta.get("notes", []), failures, console)


def _finish(
    out: Path,
    meta: dict[str, Any],
    records: list[dict[str, Any]],
    notes: list[str],
    failures: list[str],
    console: Any,
) -> int:
    from rich.console import Console
    from rich.table import Table

    rows = summarise(records)
    starts = startup_rows(records)
    goals = targets(rows)
    problems = cross_check(records)
    text = markdown(meta, rows, starts, goals, notes, failures)
    write_files(out, meta, records, rows, text)
    table = Table(title=f"asyncflow bench — {machine_line(meta)}")
    for i, col in enumerate(COLUMNS):
        table.add_column(col, justify="left" if i < 2 else "right")
    for row in table_rows(rows):
        table.add_row(*row)
    wide = Console(width=None if sys.stdout.isatty() else 150)
    wide.print(table)
    side = Table(title="start-up (to a first result) and shutdown, seconds")
    for col in ("backend", "side", "start-up", "shutdown"):
        side.add_column(col)
    for s in starts:
        side.add_row(
            s["backend"],
            s["side"],
            *(f"{s[k]:.2f}" if k in s else "-" for k in ("startup_s", "shutdown_s")),
        )
    wide.print(side)
    goal_table = Table(title="issue 7 targets")
    for col in ("backend", "target", "goal", "measured", "met"):
        goal_table.add_column(col)
    for g in goals:
        met = {True: "[green]yes", False: "[red]no", None: "-"}[g["met"]]
        value = "-" if g["value"] is None else f"{g['value']:.2f}"
        goal_table.add_row(g["backend"], g["target"], g["goal"], value, met)
    wide.print(goal_table)
    if rows:
        from .plots import plot

        for path in plot(out, rows):
            console.print(f"plot: {path}")
    for p in problems:
        console.print(f"[bold red]CROSS-CHECK FAILED: {p}")
    for f in failures:
        console.print(f"[bold red]FAILED: {f.splitlines()[0]}")
    console.print(
        f"results: {out / 'bench.json'}, {out / 'bench.csv'}, {out / 'bench.md'}"
    )
    return 1 if (problems or failures) else 0
