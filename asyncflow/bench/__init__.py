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
import sys
import time
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from ..registry import BATCH, BackendStatus, available_backends, batch_names
from .report import (
    cross_check,
    order_key,
    startup_rows,
    summarise,
    targets,
    write_files,
)
from .runner import run_backends
from .tables import COLUMNS, machine_line, markdown, table_rows
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
    workloads = _comma_list(ns.workloads)
    unknown = [w for w in workloads if w not in WORKLOADS]
    if unknown:
        print(
            f"unknown workloads {unknown}; choose from {list(WORKLOADS)}",
            file=sys.stderr,
        )
        return 2
    spec = _spec(ns, workloads)
    from rich.console import Console

    console = Console(stderr=True)
    if ns.render:
        return _render(Path(ns.out), console)
    return _run(ns, argv, status, spec, console)


def _spec(ns: argparse.Namespace, workloads: list[str]) -> dict[str, Any]:
    """What each backend's child process is told to run."""
    return {
        "workloads": workloads,
        "sizes": [int(s) for s in ns.sizes.split(",")],
        "repeat": ns.repeat,
        "quick": ns.quick,
        "profile": str(Path(ns.out).resolve()) if ns.profile else None,
        "hpc": _allocation(ns.hpc) if ns.hpc else None,
    }


def _run(
    ns: argparse.Namespace,
    argv: list[str],
    status: dict[str, BackendStatus],
    spec: dict[str, Any],
    console: Any,
) -> int:
    """Each backend in its own subprocess, then the files, tables and verdict;
    ``meta`` keeps what the run's figures depend on, the load while it ran too."""
    notes: list[str] = []
    wanted = _wanted(ns.backends, status, spec["hpc"])
    backends = _installed(wanted, status, notes, console)
    total = _count_runs(backends, spec["workloads"], spec["sizes"], ns, notes, console)
    meta = _machine(argv)
    Path(ns.out).mkdir(parents=True, exist_ok=True)
    records, failures = run_backends(backends, spec, ns.timeout, total, notes, console)
    loads = [r["load"] for r in records if r["kind"] == "run" and "load" in r]
    meta["load_after"] = os.getloadavg()
    meta["load_max"] = max(loads) if loads else None
    meta["notes"] = notes
    meta["failures"] = failures
    return _finish(Path(ns.out), meta, records, notes, failures, console)


def _comma_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _wanted(
    choice: str, status: dict[str, BackendStatus], hpc: dict[str, Any] | None
) -> list[str]:
    """``--backends all`` is every backend known, the in-tree ones first in the
    table's order; with an allocation, only those that take one."""
    if choice != "all":
        return _comma_list(choice)
    wanted = sorted(status, key=order_key)
    return wanted if hpc is None else [n for n in wanted if n in BATCH]


def _installed(
    wanted: list[str], status: dict[str, BackendStatus], notes: list[str], console: Any
) -> list[str]:
    """The wanted backends that can run here; the rest go into the notes, so
    that a table missing a backend says why."""
    backends = []
    for name in wanted:
        s = status.get(name)
        if s is None or not s.installed:
            hint = s.install_hint if s else "unknown backend"
            notes.append(f"{name} skipped: not installed ({hint})")
            console.print(f"[yellow]skipping {name}: not installed ({hint})")
        else:
            backends.append(name)
    return backends


def _count_runs(
    backends: list[str],
    workloads: list[str],
    sizes: list[int],
    ns: argparse.Namespace,
    notes: list[str],
    console: Any,
) -> int:
    """How many timed runs the progress bar counts; a size a backend cannot
    take is capped, and noted with the reason."""
    total = 0
    for name in backends:
        capped: dict[str, list[str]] = {}
        for w in workloads:
            these, why = WORKLOADS[w].sizes_for(name, sizes, ns.quick)
            total += 2 * len(these) * ns.repeat
            if why:
                capped.setdefault(why, []).append(f"{w} at {max(these)}")
        for why, which in capped.items():
            notes.append(f"{name}: sizes capped ({', '.join(which)}): {why}")
            console.print(f"[yellow]{notes[-1]}")
    return total


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
    rows = summarise(records)
    starts = startup_rows(records)
    goals = targets(rows)
    problems = cross_check(records)
    text = markdown(meta, rows, starts, goals, notes, failures)
    write_files(out, meta, records, rows, text)
    _print_tables(meta, rows, starts, goals)
    if rows:
        from .plots import plot

        for path in plot(out, rows):
            console.print(f"plot: {path}")
    _print_outcome(out, problems, failures, console)
    return 1 if (problems or failures) else 0


def _print_tables(
    meta: dict[str, Any],
    rows: list[dict[str, Any]],
    starts: list[dict[str, Any]],
    goals: list[dict[str, Any]],
) -> None:
    """The run's three tables on stdout, wide enough for a log when piped."""
    from rich.console import Console

    wide = Console(width=None if sys.stdout.isatty() else 150)
    wide.print(_results_table(meta, rows))
    wide.print(_startup_table(starts))
    wide.print(_targets_table(goals))


def _results_table(meta: dict[str, Any], rows: list[dict[str, Any]]) -> Any:
    from rich.table import Table

    table = Table(title=f"asyncflow bench — {machine_line(meta)}")
    for i, col in enumerate(COLUMNS):
        table.add_column(col, justify="left" if i < 2 else "right")
    for row in table_rows(rows):
        table.add_row(*row)
    return table


def _startup_table(starts: list[dict[str, Any]]) -> Any:
    from rich.table import Table

    side = Table(title="start-up (to a first result) and shutdown, seconds")
    for col in ("backend", "side", "start-up", "shutdown"):
        side.add_column(col)
    for s in starts:
        side.add_row(
            s["backend"],
            s["side"],
            *(f"{s[k]:.2f}" if k in s else "-" for k in ("startup_s", "shutdown_s")),
        )
    return side


def _targets_table(goals: list[dict[str, Any]]) -> Any:
    from rich.table import Table

    goal_table = Table(title="issue 7 targets")
    for col in ("backend", "target", "goal", "measured", "met"):
        goal_table.add_column(col)
    for g in goals:
        met = {True: "[green]yes", False: "[red]no", None: "-"}[g["met"]]
        value = "-" if g["value"] is None else f"{g['value']:.2f}"
        goal_table.add_row(g["backend"], g["target"], g["goal"], value, met)
    return goal_table


def _print_outcome(
    out: Path, problems: list[str], failures: list[str], console: Any
) -> None:
    """Wrong answers and broken backends last, where a reader of the log looks
    first; then where the files are."""
    for p in problems:
        console.print(f"[bold red]CROSS-CHECK FAILED: {p}")
    for f in failures:
        console.print(f"[bold red]FAILED: {f.splitlines()[0]}")
    console.print(
        f"results: {out / 'bench.json'}, {out / 'bench.csv'}, {out / 'bench.md'}"
    )
