"""``asyncflow bench``: the same workloads on every runtime, against each
runtime's own API, measured in the same run.

Each backend runs in a fresh subprocess (see :mod:`.child`); the parent collects
its JSON lines, shows progress, prints a table, writes JSON, CSV and PNG plots,
and fails loudly if two backends disagree on an answer.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..registry import available_backends
from .report import cross_check, plot, summarise, write_files
from .workloads import WORKLOADS

__all__ = ["main"]

ORDER = ["threads", "processes", "dask", "ray", "parsl", "radical"]


def _machine() -> dict[str, Any]:
    mem = None
    try:
        with open("/proc/meminfo") as f:
            mem = int(f.readline().split()[1]) * 1024
    except OSError:
        pass
    versions = {s.name: s.version for s in available_backends() if s.installed}
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cores": os.cpu_count(),
        "memory_bytes": mem,
        "load_before": os.getloadavg(),
        "versions": versions,
    }


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
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
        help="small sizes, one repeat: a smoke test in minutes",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=1800,
        help="seconds one backend may take before it is abandoned",
    )
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    ns = _parse(argv)
    if ns.quick:
        ns.sizes, ns.repeat = "100", 1
    status = {s.name: s for s in available_backends()}
    wanted = (
        [n for n in ORDER if n in status]
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
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    console = Console(stderr=True)
    backends = []
    for name in wanted:
        s = status.get(name)
        if s is None or not s.installed:
            hint = s.install_hint if s else "unknown backend"
            console.print(f"[yellow]skipping {name}: not installed ({hint})")
        else:
            backends.append(name)
    meta = _machine()
    records: list[dict[str, Any]] = []
    per_backend = 2 * len(workloads) * len(sizes) * ns.repeat
    failed = []
    with Progress(console=console, transient=True) as progress:
        bar = progress.add_task("benchmarking", total=per_backend * len(backends))
        for name in backends:
            progress.update(bar, description=f"benchmarking {name}")
            spec = json.dumps(
                {
                    "backend": name,
                    "workloads": workloads,
                    "sizes": sizes,
                    "repeat": ns.repeat,
                }
            )
            proc = subprocess.Popen(
                [sys.executable, "-m", "asyncflow.bench.child", spec],
                stdout=subprocess.PIPE,
                text=True,
            )
            assert proc.stdout is not None
            for line in proc.stdout:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a runtime printing to stdout
                rec["backend"] = name
                records.append(rec)
                if rec["kind"] == "run":
                    progress.advance(bar)
                elif rec["kind"] == "error":
                    console.print(f"[red]{name} {rec['side']}: {rec['text']}")
            if proc.wait(timeout=ns.timeout) != 0:
                failed.append(name)
                console.print(
                    f"[red]{name}: benchmark process exited {proc.returncode}"
                )
    meta["load_after"] = os.getloadavg()
    rows = summarise(records)
    out = Path(ns.out)
    write_files(out, meta, records, rows)
    table = Table(
        title=f"asyncflow bench — {meta['date']} — {meta['cores']} cores, "
        f"load {meta['load_before'][0]:.1f}"
    )
    for col in (
        "backend",
        "workload",
        "size",
        "asyncflow tasks/s",
        "raw tasks/s",
        "ratio",
        "ms/hop (af / raw)",
    ):
        table.add_column(col, justify="right" if col != "backend" else "left")
    for r in rows:
        hop = ""
        if "asyncflow_ms_per_hop" in r:
            raw_hop = r.get("raw_ms_per_hop")
            hop = f"{r['asyncflow_ms_per_hop']:.3f} / " + (
                f"{raw_hop:.3f}" if raw_hop else "-"
            )
        table.add_row(
            r["backend"],
            r["workload"],
            str(r["size"]),
            f"{r['asyncflow_tasks_per_s']:.0f}",
            f"{r['raw_tasks_per_s']:.0f}" if r["raw_tasks_per_s"] else "-",
            f"{r['throughput_ratio']:.2f}" if r["throughput_ratio"] else "-",
            hop,
        )
    Console().print(table)
    startup = [r for r in records if r["kind"] in ("startup", "shutdown")]
    for r in startup:
        console.print(
            f"{r['backend']:>10} {r['side']:>9} {r['kind']:>8}: {r['seconds']:.2f} s"
        )
    if rows:
        for path in plot(out, rows):
            console.print(f"plot: {path}")
    problems = cross_check(rows)
    for p in problems:
        console.print(f"[bold red]CROSS-CHECK FAILED: {p}")
    console.print(f"results: {out / 'bench.json'}, {out / 'bench.csv'}")
    return 1 if (problems or failed) else 0
