"""The PNG plots of a benchmark run (matplotlib, headless).

Five figures, each answering one question a user choosing a runtime asks: how
many tasks per second, how long per dependent hop, does the cost grow linearly
(log-log, so a slope of 1 is visible as such), what asyncflow costs on top of
each runtime, and how short a task may be before the runtime wastes the
machine (efficiency against task duration).  Small files (about 30 kB each):
they are committed under ``docs/bench``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .report import order_key

DPI = 90
#: the bar charts' two sides: offset from the tick, row key prefix, legend
_SIDES = ((-0.2, "asyncflow", "asyncflow"), (0.2, "raw", "raw runtime API"))


def plot(out: Path, rows: list[dict[str, Any]]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    figures = _Figures(out, rows)
    figures.bars(
        "throughput.png",
        "no-op fan-out throughput (largest size run)",
        "tasks/s",
        "fanout",
        "tasks_per_s",
    )
    figures.bars(
        "latency.png",
        "dependent chain: latency per hop",
        "ms per hop",
        "chain",
        "ms_per_hop",
    )
    figures.scaling()
    figures.overhead()
    figures.efficiency()
    return figures.paths


def _plain_log(ax: Any) -> None:
    """Log axis, but 0.6 and 2 rather than 6x10^-1 and 2x10^0."""
    from matplotlib.ticker import LogLocator, ScalarFormatter

    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(ScalarFormatter(useOffset=False))
    ax.yaxis.get_minor_formatter().set_scientific(False)


class _Figures:
    """One run's figures: each method draws one and saves it under ``out``.

    pyplot is imported on first use rather than with this module: :func:`plot`
    selects the Agg backend before pyplot loads, so that no display is needed."""

    def __init__(self, out: Path, rows: list[dict[str, Any]]) -> None:
        import matplotlib.pyplot as plt

        self.plt = plt
        self.out = out
        self.rows = rows
        self.backends = sorted({r["backend"] for r in rows}, key=order_key)
        self.paths: list[Path] = []

    def largest(self, backend: str, workload: str) -> dict[str, Any] | None:
        rs = [
            r
            for r in self.rows
            if r["backend"] == backend and r["workload"] == workload
        ]
        return max(rs, key=lambda r: r["tasks"]) if rs else None

    def save(self, fig: Any, name: str) -> None:
        fig.tight_layout()
        fig.savefig(self.out / name, dpi=DPI)
        self.plt.close(fig)
        self.paths.append(self.out / name)

    def at_largest(self, workload: str, key: str) -> list[Any]:
        """``key`` of each backend's largest ``workload`` row; ``None`` where
        the backend did not run it."""
        return [(self.largest(b, workload) or {}).get(key) for b in self.backends]

    def bars(self, name: str, title: str, ylabel: str, workload: str, key: str) -> None:
        """asyncflow next to the raw API, per backend, at the largest size."""
        fig, ax = self.plt.subplots(figsize=(7, 4))
        xs = range(len(self.backends))
        shown: list[float] = []
        for dx, side, label in _SIDES:
            vals = self.at_largest(workload, f"{side}_{key}")
            ax.bar([x + dx for x in xs], [v or 0 for v in vals], 0.4, label=label)
            shown += [v for v in vals if v]
        ax.set_xticks(list(xs), self.backends)
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        if shown:  # log axes need a positive value
            ax.set_yscale("log")
        ax.legend()
        self.save(fig, name)

    def scaling(self) -> None:
        """Makespan against size, log-log, one colour per backend."""
        fig, axes = self.plt.subplots(1, 2, figsize=(10, 4), sharey=True)
        for ax, workload in zip(axes, ("fanout", "chain"), strict=True):
            for i, b in enumerate(self.backends):
                self._scaling_lines(ax, workload, b, f"C{i}")
            if ax.lines:
                ax.set_xscale("log")
                ax.set_yscale("log")
            ax.set_xlabel("tasks")
            ax.set_title(f"{workload}: makespan against size")
        axes[0].set_ylabel("seconds (solid: asyncflow, dashed: raw)")
        if axes[0].lines:
            axes[0].legend(fontsize=8)
        self.save(fig, "scaling.png")

    def _scaling_lines(self, ax: Any, workload: str, backend: str, color: str) -> None:
        rs = sorted(
            (
                r
                for r in self.rows
                if r["backend"] == backend and r["workload"] == workload
            ),
            key=lambda r: r["tasks"],
        )
        if not rs:
            return
        xs = [r["tasks"] for r in rs]
        ax.plot(xs, [r["asyncflow_s"] for r in rs], "o-", color=color, label=backend)
        raw = [(r["tasks"], r["raw_s"]) for r in rs if r["raw_s"]]
        if raw:
            ax.plot(*zip(*raw, strict=True), "x--", color=color, alpha=0.6)

    def overhead(self) -> None:
        """Throughput ratio per backend and workload, with the issue's 0.9 line."""
        fig, ax = self.plt.subplots(figsize=(8, 4))
        backends = self.backends
        workloads = sorted({r["workload"] for r in self.rows})
        width = 0.8 / max(1, len(workloads))
        ratios: list[float] = []
        for i, w in enumerate(workloads):
            vals = [v or 0 for v in self.at_largest(w, "throughput_ratio")]
            ratios += [v for v in vals if v]
            ax.bar([x + i * width for x in range(len(backends))], vals, width, label=w)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.axhline(0.9, color="grey", linewidth=0.8, linestyle=":")
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(backends))], backends)
        ax.set_ylabel("raw time / asyncflow time")
        if ratios:
            _plain_log(ax)
        ax.set_title("asyncflow against each runtime's own API (1 = no overhead)")
        ax.legend(fontsize=7, ncol=3)
        self.save(fig, "overhead.png")

    def efficiency(self) -> None:
        """Ideal makespan over measured, against the sweep's task durations."""
        from .workloads import WORK

        rows = [r for r in self.rows if r["workload"] in WORK]
        if not rows:
            return
        fig, ax = self.plt.subplots(figsize=(7, 4))
        colors = self.plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for i, backend in enumerate(self.backends):
            for side, style in (("asyncflow", "-"), ("raw", "--")):
                points = _sweep_points(rows, backend, side, WORK)
                if points:
                    xs, ys = zip(*points, strict=True)
                    color, label = colors[i % len(colors)], f"{backend} ({side})"
                    ax.plot(xs, ys, style, marker="o", color=color, label=label)
        ax.set_xscale("log")
        ax.set_xlabel("CPU work per task (ms)")
        ax.set_ylabel("ideal makespan / measured")
        ax.set_ylim(0, 1.05)
        ax.set_title("efficiency against task duration (2 workers)")
        ax.legend(fontsize=7, ncol=2)
        self.save(fig, "efficiency.png")


def _sweep_points(
    rows: list[dict[str, Any]], backend: str, side: str, work: dict[str, Any]
) -> list[tuple[float, float]]:
    """(milliseconds of work per task, efficiency) for one backend and side."""
    key = f"{side}_efficiency"
    return sorted(
        (work[r["workload"]][0] * 1e3, r[key])
        for r in rows
        if r["backend"] == backend and r.get(key)
    )
