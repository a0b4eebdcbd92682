"""``asyncflow bench --quick`` runs end to end: table, JSON, CSV, plots."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(600)

BACKENDS = os.environ.get("ASYNCFLOW_BENCH_BACKENDS", "threads,processes")


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
        timeout=540,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads((out / "bench.json").read_text())
    backends = {row["backend"] for row in data["summary"]}
    assert backends == set(BACKENDS.split(","))
    assert {row["workload"] for row in data["summary"]} == {
        "fanout",
        "chain",
        "diamond",
        "mapreduce",
        "sleep",
        "exec",
    }
    assert all(row["raw_s"] for row in data["summary"]), "raw baseline measured"
    assert data["meta"]["cores"] and data["meta"]["load_before"]
    for name in (
        "throughput.png",
        "latency.png",
        "scaling.png",
        "overhead.png",
        "bench.csv",
    ):
        assert (out / name).stat().st_size > 0
    assert "CROSS-CHECK FAILED" not in result.stderr


def test_unknown_workload_is_rejected() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "asyncflow", "bench", "--workloads", "nope"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and "unknown workloads" in result.stderr
