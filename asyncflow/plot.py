"""Gantt charts from Chrome trace files (``asyncflow plot run.json``)."""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["gantt"]

_COLORS = {"done": "tab:green", "failed": "tab:red", "cancelled": "tab:gray"}


def gantt(trace_path: str | Path, output: str | Path = "gantt.png") -> Path:
    """One row per backend slot, one bar per task, coloured by final state."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    events = json.loads(Path(trace_path).read_text())["traceEvents"]
    names = {
        (e["pid"], e.get("tid")): e["args"]["name"] for e in events if e["ph"] == "M"
    }
    bars = [e for e in events if e["ph"] == "X"]
    rows = sorted({(e["pid"], e["tid"]) for e in bars})
    index = {row: i for i, row in enumerate(rows)}
    fig, ax = plt.subplots(figsize=(10, max(2.0, 0.4 * len(rows) + 1)))
    for e in bars:
        ax.barh(
            index[(e["pid"], e["tid"])],
            e["dur"] / 1e3,
            left=e["ts"] / 1e3,
            height=0.8,
            color=_COLORS.get(e["cat"], "tab:blue"),
            edgecolor="black",
            linewidth=0.3,
        )
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(
        [f"{names.get((p, None), p)} / {names.get((p, t), t)}" for p, t in rows]
    )
    ax.invert_yaxis()
    ax.set_xlabel("time since the engine started (ms)")
    ax.set_title(f"{len(bars)} tasks on {len(rows)} slot(s)")
    fig.tight_layout()
    out = Path(output)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
