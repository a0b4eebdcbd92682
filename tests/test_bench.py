"""``asyncflow bench --quick --backends all`` runs end to end, every installed
runtime included: tables, JSON, CSV, Markdown, plots, the raw baselines, and
answers that agree.  A smoke test: CI runs it but does not time it (the issue's
3 minutes hold on a quiet machine; a loaded one takes several times longer)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from asyncflow.bench.workloads import WORKLOADS as ALL_WORKLOADS
from asyncflow.registry import available_backends

BACKENDS = os.environ.get("ASYNCFLOW_BENCH_BACKENDS", "all")
WORKLOADS = set(ALL_WORKLOADS)


@pytest.mark.timeout(900)
def test_quick_bench_smoke(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "asyncflow",
            "bench",
            "--quick",
            "--backends",
            BACKENDS,
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=870,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "CROSS-CHECK FAILED" not in result.stderr
    data = json.loads((out / "bench.json").read_text())
    wanted = (
        {s.name for s in available_backends() if s.installed}
        if BACKENDS == "all"
        else set(BACKENDS.split(","))
    )
    assert {row["backend"] for row in data["summary"]} == wanted
    for backend in wanted:
        ran = {r["workload"] for r in data["summary"] if r["backend"] == backend}
        assert ran == WORKLOADS, backend
    skipped = {
        (r["backend"], r.get("workload"))
        for r in data["records"]
        if r["kind"] in ("skip", "note") and r["side"] == "raw"
    }
    for row in data["summary"]:
        key = (row["backend"], row["workload"])
        assert row["raw_s"] or key in skipped or (row["backend"], None) in skipped, (
            f"raw baseline for {key}"
        )
    sides = {(s["backend"], s["side"]) for s in data["startup"]}
    assert {(b, "asyncflow") for b in wanted} <= sides
    meta = data["meta"]
    assert meta["cores"] and meta["memory_bytes"] and meta["load_before"]
    assert meta["load_after"] and set(meta["versions"]) >= wanted - {
        "threads",
        "processes",
    }
    for name in (
        "throughput.png",
        "latency.png",
        "scaling.png",
        "overhead.png",
        "bench.csv",
        "bench.md",
    ):
        assert (out / name).stat().st_size > 0
    assert "| backend | workload |" in (out / "bench.md").read_text()


def test_unknown_workload_is_rejected() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "asyncflow", "bench", "--workloads", "nope"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and "unknown workloads" in result.stderr
