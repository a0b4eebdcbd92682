"""Turning benchmark records into a table, JSON, CSV and plots."""

from __future__ import annotations

import csv
import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any


def summarise(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Median over repeats, asyncflow next to raw, per backend/workload/size."""
    groups: dict[tuple[str, str, int, str], list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        if r["kind"] == "run":
            groups[(r["backend"], r["workload"], r["size"], r["side"])].append(r)
    rows = []
    for (backend, workload, size, side), runs in sorted(groups.items()):
        if side != "asyncflow":
            continue
        af = statistics.median(r["seconds"] for r in runs)
        tasks = runs[0]["tasks"]
        raw_runs = groups.get((backend, workload, size, "raw"), [])
        raw = statistics.median(r["seconds"] for r in raw_runs) if raw_runs else None
        row = {
            "backend": backend,
            "workload": workload,
            "size": size,
            "tasks": tasks,
            "asyncflow_s": af,
            "raw_s": raw,
            "asyncflow_tasks_per_s": tasks / af if af else None,
            "raw_tasks_per_s": (tasks / raw) if raw else None,
            # throughput ratio: >= 1 means asyncflow is at least as fast as raw
            "throughput_ratio": (raw / af) if (raw and af) else None,
            "result": runs[0]["result"],
        }
        if workload == "chain":
            row["asyncflow_ms_per_hop"] = af / size * 1e3
            row["raw_ms_per_hop"] = (raw / size * 1e3) if raw else None
        if workload == "sleep":
            from .workloads import SLEEP

            ideal = -(-tasks // 2) * SLEEP
            row["makespan_efficiency"] = ideal / af
        rows.append(row)
    return rows


def cross_check(rows: list[dict[str, Any]]) -> list[str]:
    """Every backend must compute the same answer for the same workload."""
    answers: dict[tuple[str, int], dict[str, Any]] = defaultdict(dict)
    for row in rows:
        answers[(row["workload"], row["size"])][row["backend"]] = row["result"]
    problems = []
    for (workload, size), by_backend in sorted(answers.items()):
        if len({json.dumps(v) for v in by_backend.values()}) > 1:
            problems.append(f"{workload} size {size}: backends disagree: {by_backend}")
    return problems


def write_files(
    out: Path,
    meta: dict[str, Any],
    records: list[dict[str, Any]],
    rows: list[dict[str, Any]],
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(
        json.dumps({"meta": meta, "summary": rows, "records": records}, indent=1)
    )
    if rows:
        keys = sorted({k for row in rows for k in row})
        with open(out / "bench.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(rows)


def plot(out: Path, rows: list[dict[str, Any]]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    backends = sorted({r["backend"] for r in rows})

    def bar(name: str, title: str, ylabel: str, value: Any, log: bool = False) -> None:
        fig, ax = plt.subplots(figsize=(7, 4))
        af = [value(b, "asyncflow") for b in backends]
        raw = [value(b, "raw") for b in backends]
        xs = range(len(backends))
        ax.bar([x - 0.2 for x in xs], [v or 0 for v in af], 0.4, label="asyncflow")
        ax.bar([x + 0.2 for x in xs], [v or 0 for v in raw], 0.4, label="raw runtime")
        ax.set_xticks(list(xs), backends)
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        if log:
            ax.set_yscale("log")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        paths.append(out / name)

    def largest(backend: str, workload: str) -> dict[str, Any] | None:
        rs = [r for r in rows if r["backend"] == backend and r["workload"] == workload]
        return max(rs, key=lambda r: r["size"]) if rs else None

    def fan(b: str, side: str) -> Any:
        r = largest(b, "fanout")
        return r and r[f"{side}_tasks_per_s"]

    def hop(b: str, side: str) -> Any:
        r = largest(b, "chain")
        return r and r.get(f"{side}_ms_per_hop")

    bar(
        "throughput.png",
        "no-op fan-out throughput (largest size)",
        "tasks/s",
        fan,
        log=True,
    )
    bar("latency.png", "dependent chain: latency per hop", "ms per hop", hop, log=True)

    fig, ax = plt.subplots(figsize=(7, 4))
    for b in backends:
        rs = sorted(
            (r for r in rows if r["backend"] == b and r["workload"] == "fanout"),
            key=lambda r: r["size"],
        )
        if rs:
            ax.plot(
                [r["size"] for r in rs], [r["asyncflow_s"] for r in rs], "o-", label=b
            )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("tasks")
    ax.set_ylabel("makespan (s)")
    ax.set_title("fan-out makespan against size (slope 1 = linear cost)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "scaling.png", dpi=110)
    plt.close(fig)
    paths.append(out / "scaling.png")

    fig, ax = plt.subplots(figsize=(7, 4))
    workloads = sorted({r["workload"] for r in rows})
    width = 0.8 / max(1, len(workloads))
    for i, w in enumerate(workloads):
        vals = []
        for b in backends:
            r = largest(b, w)
            vals.append((r or {}).get("throughput_ratio") or 0)
        ax.bar([x + i * width for x in range(len(backends))], vals, width, label=w)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(backends))], backends)
    ax.set_ylabel("raw time / asyncflow time")
    ax.set_title("overhead ratio (1.0 = as fast as the raw runtime)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "overhead.png", dpi=110)
    plt.close(fig)
    paths.append(out / "overhead.png")
    return paths
