"""Merge rows re-measured in a later ``asyncflow bench`` run into the published
run (``docs/bench/bench.json``), then re-render it.

The README's table comes from one run of the command; when a fix changes one
backend's figures, that backend's affected workloads are measured again rather
than the whole matrix (an hour on this machine).  Their ``run`` records replace
the published ones, and a note in ``meta.notes`` says which rows came from which
run, with its date, load and command, so the table never mixes runs silently.

    python benchmarks/bench_merge.py NEW_DIR "why it was re-measured" [--out docs/bench]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from asyncflow.bench import main as bench


def main(argv: list[str] | None = None) -> int:
    ns = _parse(argv)
    target = ns.out / "bench.json"
    old = json.loads(target.read_text())
    new = json.loads((ns.new / "bench.json").read_text())
    runs = [r for r in new["records"] if r["kind"] == "run"]
    pairs = sorted({(r["backend"], r["workload"]) for r in runs})
    if not pairs:
        raise SystemExit(f"{ns.new}: no run records to merge")
    note = _note(pairs, [r["load"] for r in runs], new["meta"], ns.why)
    old["records"] = _replaced(old["records"], runs, pairs)
    old["meta"].setdefault("notes", []).append(note)
    target.write_text(json.dumps(old, indent=1) + "\n")
    return bench(["--render", "--out", str(ns.out)])


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("new", type=Path, help="OUT directory of the re-measuring run")
    p.add_argument("why", help="what changed, for the note")
    p.add_argument("--out", type=Path, default=Path("docs/bench"))
    return p.parse_args(argv)


def _replaced(
    records: list[dict[str, Any]],
    runs: list[dict[str, Any]],
    pairs: list[tuple[str, str]],
) -> list[dict[str, Any]]:
    """The published records with the re-measured backend/workload runs
    swapped for the new ones; everything else kept."""
    return [
        r
        for r in records
        if not (r["kind"] == "run" and (r["backend"], r["workload"]) in pairs)
    ] + runs


def _note(
    pairs: list[tuple[str, str]], loads: list[float], meta: dict[str, Any], why: str
) -> str:
    """Which rows came from the later run, and when, how loaded and how run."""
    by_backend: dict[str, list[str]] = {}
    for backend, workload in pairs:
        by_backend.setdefault(backend, []).append(workload)
    rows = "; ".join(f"{b} {', '.join(w)}" for b, w in by_backend.items())
    return (
        f"{rows}: re-measured at {meta['date']} (load {min(loads):.1f}-"
        f"{max(loads):.1f}) {why}, with `{meta['command']}`"
    )


if __name__ == "__main__":
    sys.exit(main())
