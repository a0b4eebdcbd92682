"""Turning benchmark records into rows, checks against the issue's targets, and
files: JSON (everything), CSV (the rows) and Markdown (what the README shows).

Kept free of runtimes and of rich, so the logic is unit-tested in milliseconds.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from ..registry import ADAPTERS
from .workloads import SLEEP, WORKLOADS

#: the issue's figures: asyncflow throughput / raw, at least (threads: 1/3)
THROUGHPUT_GOAL, THREADS_GOAL = 0.9, 1 / 3
HOP_GOAL = 1.2  # asyncflow ms per chain hop / raw, at most
#: makespan ~ tasks**exponent between the smallest and largest size; 1 is linear
GROWTH_GOAL = 1.15


def _median(runs: list[dict[str, Any]]) -> float | None:
    return statistics.median(r["seconds"] for r in runs) if runs else None


def summarise(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Median over repeats, asyncflow next to raw, per backend/workload/size."""
    groups: dict[tuple[str, str, int, str], list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        if r["kind"] == "run":
            groups[(r["backend"], r["workload"], r["size"], r["side"])].append(r)
    rows = [
        _row(
            backend,
            workload,
            size,
            runs,
            groups.get((backend, workload, size, "raw"), []),
        )
        for (backend, workload, size, side), runs in sorted(groups.items())
        if side == "asyncflow"
    ]
    _growth(rows)
    return rows


def _row(
    backend: str,
    workload: str,
    size: int,
    runs: list[dict[str, Any]],
    raw_runs: list[dict[str, Any]],
) -> dict[str, Any]:
    """One backend/workload/size: asyncflow's runs against the raw ones, which
    may be missing (``None`` then where raw figures would be)."""
    af, raw = _median(runs), _median(raw_runs)
    tasks = runs[0]["tasks"]
    loads = [r["load"] for r in runs if r.get("load") is not None]
    return {
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
        "load": statistics.median(loads) if loads else None,
        "result": runs[0]["result"],
        **_cpu_cells(tasks, runs, raw_runs),
        **_workload_cells(workload, size, tasks, af, raw),
    }


def _cpu_cells(
    tasks: int, runs: list[dict[str, Any]], raw_runs: list[dict[str, Any]]
) -> dict[str, float]:
    """Driver CPU per task, for each side whose runs measured it."""
    cells = {}
    for name, rs in (("asyncflow", runs), ("raw", raw_runs)):
        cpu = [r["cpu_s"] for r in rs if "cpu_s" in r]
        if cpu:
            cells[f"{name}_cpu_ms_per_task"] = statistics.median(cpu) / tasks * 1e3
    return cells


def _workload_cells(
    workload: str, size: int, tasks: int, af: float | None, raw: float | None
) -> dict[str, Any]:
    """The figures only one workload has: a chain's latency per hop, sleep's
    makespan against two workers' ideal."""
    if workload == "chain":
        return {
            "asyncflow_ms_per_hop": af / size * 1e3 if af else None,
            "raw_ms_per_hop": (raw / size * 1e3) if raw else None,
            "hop_ratio": (af / raw) if (af and raw) else None,
        }
    if workload == "sleep" and af:
        return {"makespan_efficiency": -(-tasks // 2) * SLEEP / af}
    return {}


def _growth(rows: list[dict[str, Any]]) -> None:
    """On each backend/workload's largest row: the exponent of makespan against
    task count from its smallest row (1.0: cost grows linearly)."""
    by: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by[(row["backend"], row["workload"])].append(row)
    for rs in by.values():
        lo, hi = min(rs, key=lambda r: r["tasks"]), max(rs, key=lambda r: r["tasks"])
        if hi["tasks"] <= lo["tasks"]:
            continue
        for side in ("asyncflow", "raw"):
            a, b = lo[f"{side}_s"], hi[f"{side}_s"]
            if a and b:
                hi[f"{side}_growth"] = math.log(b / a) / math.log(
                    hi["tasks"] / lo["tasks"]
                )


def startup_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Start-up (to a first result) and shutdown seconds, per backend and side."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for r in records:
        if r["kind"] in ("startup", "shutdown"):
            row = out.setdefault(
                (r["backend"], r["side"]), {"backend": r["backend"], "side": r["side"]}
            )
            row[f"{r['kind']}_s"] = r["seconds"]
    return list(out.values())


def cross_check(records: list[dict[str, Any]]) -> list[str]:
    """Every run, on either side of every backend, must give the workload's one
    right answer; backends that disagree are named together."""
    answers: dict[tuple[str, int], dict[str, set[str]]] = defaultdict(
        lambda: defaultdict(set)
    )
    problems = []
    for r in records:
        if r["kind"] != "run":
            continue
        who = f"{r['backend']}/{r['side']}"
        got = json.dumps(r["result"])
        answers[(r["workload"], r["size"])][got].add(who)
        want = json.dumps(WORKLOADS[r["workload"]].expected(r["size"]))
        if got != want:
            problems.append(
                f"{r['workload']} size {r['size']}: {who} returned {got} "
                f"(repeat {r.get('repeat')}), expected {want}"
            )
    for (workload, size), by_answer in sorted(answers.items()):
        if len(by_answer) > 1:
            listing = "; ".join(
                f"{ans} from {', '.join(sorted(who))}" for ans, who in by_answer.items()
            )
            problems.append(f"{workload} size {size}: backends disagree: {listing}")
    return problems


def targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's figures per backend, met or not, at each workload's largest
    size: fan-out throughput ratio, chain hop latency ratio, growth exponents."""
    largest: dict[tuple[str, str], dict[str, Any]] = {}
    for row in rows:
        key = (row["backend"], row["workload"])
        if key not in largest or row["tasks"] > largest[key]["tasks"]:
            largest[key] = row
    backends = sorted({b for b, _ in largest}, key=order_key)
    return [t for b in backends for t in _backend_targets(b, largest)]


def _backend_targets(
    backend: str, largest: dict[tuple[str, str], dict[str, Any]]
) -> list[dict[str, Any]]:
    out = []
    fan = largest.get((backend, "fanout"))
    if fan:
        goal = THREADS_GOAL if backend == "threads" else THROUGHPUT_GOAL
        label = f"fan-out throughput vs raw ({fan['size']} tasks)"
        out.append(_target(backend, label, fan["throughput_ratio"], goal, True))
    chain = largest.get((backend, "chain"))
    if chain:
        label = f"chain ms/hop vs raw ({chain['size']} hops)"
        out.append(_target(backend, label, chain.get("hop_ratio"), HOP_GOAL, False))
    for w in ("fanout", "chain", "diamond"):
        grown = largest.get((backend, w))
        if grown and "asyncflow_growth" in grown:
            label = f"{w} cost growth exponent"
            growth = grown["asyncflow_growth"]
            out.append(_target(backend, label, growth, GROWTH_GOAL, False))
    return out


def _target(
    backend: str, what: str, value: Any, goal: float, at_least: bool
) -> dict[str, Any]:
    """``met`` is ``None`` when the figure was not measured."""
    met = None if value is None else (value >= goal if at_least else value <= goal)
    sign = ">=" if at_least else "<="
    return {
        "backend": backend,
        "target": what,
        "goal": f"{sign} {goal:.2f}",
        "value": value,
        "met": met,
    }


ORDER = list(ADAPTERS)


def order_key(backend: str) -> tuple[int, str]:
    return (ORDER.index(backend) if backend in ORDER else len(ORDER), backend)


def _f(value: Any, fmt: str = ".0f") -> str:
    return "-" if value is None else format(value, fmt)


def _rate(value: float | None) -> str:
    """Three significant figures at most: radical's 9.3/s next to 70,000/s."""
    if value is None:
        return "-"
    return format(value, ".0f" if value >= 100 else ".3g")


def table_rows(rows: list[dict[str, Any]]) -> list[list[str]]:
    """The results table, as strings, for the terminal and for Markdown."""
    out = []
    for r in sorted(
        rows, key=lambda r: (order_key(r["backend"]), r["workload"], r["size"])
    ):
        hop = ""
        if r["workload"] == "chain":
            af, raw = r["asyncflow_ms_per_hop"], r["raw_ms_per_hop"]
            hop = f"{_rate(af)} / {_rate(raw)}"
        growth = r.get("asyncflow_growth")
        out.append(
            [
                r["backend"],
                r["workload"],
                str(r["size"]),
                _rate(r["asyncflow_tasks_per_s"]),
                _rate(r["raw_tasks_per_s"]),
                _f(r["throughput_ratio"], ".2f"),
                hop,
                _f(growth, ".2f") if growth is not None else "",
                f"{_rate(r.get('asyncflow_cpu_ms_per_task'))} / "
                f"{_rate(r.get('raw_cpu_ms_per_task'))}",
                _f(r["load"], ".1f"),
            ]
        )
    return out


COLUMNS = [
    "backend",
    "workload",
    "size",
    "asyncflow tasks/s",
    "raw tasks/s",
    "ratio",
    "ms/hop af / raw",
    "growth",
    "driver CPU ms/task af / raw",
    "load",
]


def _md_table(header: list[str], body: list[list[str]]) -> list[str]:
    right = ["---:" if i > 1 else "---" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(right) + " |"]
    return lines + ["| " + " | ".join(row) + " |" for row in body]


def machine_line(meta: dict[str, Any]) -> str:
    mem = meta.get("memory_bytes")
    before, after = meta.get("load_before"), meta.get("load_after")
    load = f"load average {before[0]:.1f} before" if before else "load unknown"
    if after:
        load += f", {after[0]:.1f} after"
    if meta.get("load_max") is not None:
        load += f", {meta['load_max']:.1f} at most during the run"
    return (
        f"{meta.get('date', '?')}; {meta.get('cpu') or 'unknown CPU'}, "
        f"{meta.get('cores')} cores, {_f(mem / 2**30 if mem else None, '.0f')} GiB; "
        f"Python {meta.get('python')}; {load}"
    )


def markdown(
    meta: dict[str, Any],
    rows: list[dict[str, Any]],
    starts: list[dict[str, Any]],
    goals: list[dict[str, Any]],
    notes: list[str],
    failures: list[str] | None = None,
) -> str:
    """The run as Markdown: what ``docs/bench/bench.md`` holds and the README
    section is spliced from.  Failures come first: figures next to them are
    incomplete."""
    lines = [
        *_md_preamble(meta),
        "",
        *_md_table(COLUMNS, table_rows(rows)),
        "",
        *_md_startup(starts),
        "",
        *_md_targets(goals),
    ]
    if notes:
        lines += ["", *[f"- {n}" for n in notes]]
    if failures:
        lines += ["", "**Failed in this run** (the figures above lack what broke):"]
        lines += [f"- {f.splitlines()[0]}" for f in failures]
    return "\n".join(lines) + "\n"


def _md_preamble(meta: dict[str, Any]) -> list[str]:
    """Where and how the figures were measured, and how to read the columns:
    the tables are quoted on their own, so they must not need the code."""
    versions = ", ".join(
        f"{k} {v}" for k, v in sorted(meta.get("versions", {}).items())
    )
    return [
        f"Measured by `{meta.get('command', 'asyncflow bench')}` on "
        f"{machine_line(meta)}. Versions: {versions or '-'}.",
        "",
        "Medians over repeats. *ratio*: raw time / asyncflow time, so asyncflow's "
        "throughput relative to the runtime's own API (1.00: no overhead; above "
        "1: faster than the straightforward raw code). *growth*: x in makespan ~ "
        "tasks^x between the smallest and largest size (1: linear). *driver "
        "CPU*: CPU time of the benchmark's driver process (all its threads) per "
        "task, which other users' load skews less than wall time. *load*: "
        "1-minute load average while it ran, on "
        f"{meta.get('cores')} cores.",
    ]


def _md_startup(starts: list[dict[str, Any]]) -> list[str]:
    return _md_table(
        ["backend", "side", "start-up to first result (s)", "shutdown (s)"],
        [
            [
                s["backend"],
                s["side"],
                _f(s.get("startup_s"), ".2f"),
                _f(s.get("shutdown_s"), ".2f"),
            ]
            for s in sorted(starts, key=lambda s: (order_key(s["backend"]), s["side"]))
        ],
    )


def _md_targets(goals: list[dict[str, Any]]) -> list[str]:
    """A missed target in bold, so a reader skimming the table sees it."""
    return _md_table(
        ["backend", "target (issue 7)", "goal", "measured", "met"],
        [
            [
                g["backend"],
                g["target"],
                g["goal"],
                _f(g["value"], ".2f"),
                {True: "yes", False: "**no**", None: "-"}[g["met"]],
            ]
            for g in goals
        ],
    )


def write_files(
    out: Path,
    meta: dict[str, Any],
    records: list[dict[str, Any]],
    rows: list[dict[str, Any]],
    text: str,
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(
        json.dumps(
            {
                "meta": meta,
                "summary": rows,
                "startup": startup_rows(records),
                "targets": targets(rows),
                "records": records,
            },
            indent=1,
        )
    )
    (out / "bench.md").write_text(text)
    if rows:
        keys = sorted({k for row in rows for k in row})
        with open(out / "bench.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(rows)
