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
from .workloads import SLEEP, WORK, WORKERS, WORKLOADS

#: asyncflow throughput / raw, at least: a front end may cost a little on
#: runtimes that do not chunk (threads: the GIL-bound pool costs a third) ...
THROUGHPUT_GOAL, THREADS_GOAL = 0.9, 1 / 3
HOP_GOAL = 1.2  # asyncflow ms per chain hop / raw, at most
#: ... and must win clearly where short tasks travel in chunks: no-op fan-out
#: and diamonds (throughput / raw, at least) and chains (hop / raw, at most)
CHUNKED_GOALS = {
    "dask": (5.0, 2.0, 0.5),
    "ray": (5.0, 2.0, 0.5),
    "parsl": (5.0, 2.0, 0.5),
    "radical": (3.0, None, None),
}
#: makespan of coarse work (the sweep's 100 ms tasks) / raw's, at least
COARSE_GOAL = 0.97
#: makespan ~ tasks**exponent between the smallest and largest size; 1 is linear
GROWTH_GOAL = 1.05


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
        return {"makespan_efficiency": -(-tasks // WORKERS) * SLEEP / af}
    if workload in WORK:
        return _efficiency(WORK[workload][0], tasks, af, raw)
    return {}


def _efficiency(
    seconds: float, tasks: int, af: float | None, raw: float | None
) -> dict[str, Any]:
    """The task-duration sweep's figure: the ideal makespan on the bench's
    workers over the measured one, for each side."""
    ideal = -(-tasks // WORKERS) * seconds
    return {
        "asyncflow_efficiency": ideal / af if af else None,
        "raw_efficiency": ideal / raw if raw else None,
    }


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
    fan_goal, diamond_goal, hop_goal = CHUNKED_GOALS.get(
        backend,
        (THREADS_GOAL if backend == "threads" else THROUGHPUT_GOAL, None, HOP_GOAL),
    )
    out = []
    fan = largest.get((backend, "fanout"))
    if fan:
        label = f"fan-out throughput vs raw ({fan['size']} tasks)"
        out.append(_target(backend, label, fan["throughput_ratio"], fan_goal, True))
    diamond = largest.get((backend, "diamond"))
    if diamond and diamond_goal:
        label = f"diamond throughput vs raw ({diamond['tasks']} tasks)"
        ratio = diamond["throughput_ratio"]
        out.append(_target(backend, label, ratio, diamond_goal, True))
    chain = largest.get((backend, "chain"))
    if chain and hop_goal:
        label = f"chain ms/hop vs raw ({chain['size']} hops)"
        out.append(_target(backend, label, chain.get("hop_ratio"), hop_goal, False))
    coarse = largest.get((backend, "work100ms"))
    if coarse:
        label = f"100 ms tasks: makespan vs raw ({coarse['tasks']} tasks)"
        ratio = coarse["throughput_ratio"]
        out.append(_target(backend, label, ratio, COARSE_GOAL, True))
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
