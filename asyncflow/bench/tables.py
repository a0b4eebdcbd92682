"""The results as tables: rows of strings for the terminal, and the Markdown
the README shows.

Apart from :mod:`.report`, which computes the figures, so that what is shown
and how it is computed change independently.
"""

from __future__ import annotations

from typing import Any

from .report import order_key


def _f(value: Any, fmt: str = ".0f") -> str:
    return "-" if value is None else format(value, fmt)


def _rate(value: float | None) -> str:
    """Three significant figures at most: radical's 9.3/s next to 70,000/s."""
    if value is None:
        return "-"
    return format(value, ".0f" if value >= 100 else ".3g")


def _particular(r: dict[str, Any]) -> str:
    """A chain's milliseconds per hop, or a sweep workload's efficiency."""
    if r["workload"] == "chain":
        return f"{_rate(r['asyncflow_ms_per_hop'])} / {_rate(r['raw_ms_per_hop'])}"
    if "asyncflow_efficiency" in r:
        af, raw = r["asyncflow_efficiency"], r["raw_efficiency"]
        return f"{_f(af, '.2f')} / {_f(raw, '.2f')}"
    return ""


def table_rows(rows: list[dict[str, Any]]) -> list[list[str]]:
    """The results table, as strings, for the terminal and for Markdown."""
    out = []
    for r in sorted(
        rows, key=lambda r: (order_key(r["backend"]), r["workload"], r["size"])
    ):
        growth = r.get("asyncflow_growth")
        out.append(
            [
                r["backend"],
                r["workload"],
                str(r["size"]),
                _rate(r["asyncflow_tasks_per_s"]),
                _rate(r["raw_tasks_per_s"]),
                _f(r["throughput_ratio"], ".2f"),
                _particular(r),
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
    "ms/hop or efficiency, af / raw",
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
        "Medians over repeats; a run shorter than 0.2 s is repeated back to back "
        "within each timed sample, on both sides (as timeit does), so that costs "
        "paid less often than once per short run count at every size. *ratio*: "
        "raw time / asyncflow time, so asyncflow's "
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
