"""The benchmark's logic without runtimes: answers, cross-checks, ratios, caps,
targets and the files a run writes.  Milliseconds, so a wrong table or a
cross-check that lets a wrong answer through fails in every CI run."""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from asyncflow.bench import _finish
from asyncflow.bench.raw import Raw
from asyncflow.bench.rawrp import by_value
from asyncflow.bench.report import cross_check, summarise, targets
from asyncflow.bench.tables import markdown
from asyncflow.bench.workloads import WORKLOADS, nap


class InlineRaw(Raw):
    """Runs each task at once in the test's thread: the workloads' own logic."""

    def submit(self, fn: Callable[..., Any], *args: Any) -> Any:
        return fn(*args)

    def gather(self, handles: list[Any]) -> list[Any]:
        return list(handles)


@pytest.mark.parametrize("workload", sorted(WORKLOADS))
@pytest.mark.parametrize("n", [1, 7, 33])
def test_expected_is_what_the_workload_computes(workload: str, n: int) -> None:
    assert WORKLOADS[workload].raw(InlineRaw(), n) == WORKLOADS[workload].expected(n)


def run(backend: str, side: str, workload: str, size: int, **kw: Any) -> dict[str, Any]:
    rec = {
        "kind": "run",
        "backend": backend,
        "side": side,
        "workload": workload,
        "size": size,
        "repeat": 0,
        "seconds": 1.0,
        "tasks": WORKLOADS[workload].tasks(size),
        "result": WORKLOADS[workload].expected(size),
        "load": 0.5,
    }
    rec.update(kw)
    return rec


def test_cross_check_passes_identical_right_answers() -> None:
    recs = [
        run(b, s, "fanout", 10)
        for b in ("threads", "dask")
        for s in ("raw", "asyncflow")
    ]
    assert cross_check(recs) == []


def test_cross_check_names_a_wrong_answer_and_the_disagreement() -> None:
    recs = [run("threads", "asyncflow", "chain", 10), run("dask", "raw", "chain", 10)]
    recs.append(run("ray", "asyncflow", "chain", 10, result=9))
    problems = cross_check(recs)
    assert any("ray/asyncflow returned 9" in p for p in problems)
    assert any("backends disagree" in p and "ray/asyncflow" in p for p in problems)


def test_summarise_ratio_hop_latency_and_growth() -> None:
    recs = [
        run("dask", "asyncflow", "chain", 100, seconds=2.0),
        run("dask", "raw", "chain", 100, seconds=1.0),
        run("dask", "asyncflow", "chain", 1000, seconds=20.0),
        run("dask", "raw", "chain", 1000, seconds=12.0),
        run("dask", "asyncflow", "chain", 1000, seconds=30.0, repeat=1),
        run("dask", "asyncflow", "chain", 1000, seconds=10.0, repeat=2),
    ]
    small, big = summarise(recs)
    assert small["throughput_ratio"] == 0.5
    assert small["hop_ratio"] == 2.0
    assert big["asyncflow_s"] == 20.0  # the median of three repeats
    assert big["asyncflow_ms_per_hop"] == pytest.approx(20.0)
    assert big["asyncflow_growth"] == pytest.approx(1.0)
    assert big["raw_growth"] == pytest.approx(1.0792, abs=1e-3)


def test_targets_threads_have_their_own_goal() -> None:
    recs = [
        run("threads", "asyncflow", "fanout", 100, seconds=2.0),
        run("threads", "raw", "fanout", 100, seconds=1.0),
        run("ray", "asyncflow", "fanout", 100, seconds=2.0),
        run("ray", "raw", "fanout", 100, seconds=1.0),
        run("ray", "asyncflow", "chain", 100, seconds=1.1),
    ]
    got = {(t["backend"], t["target"].split()[0]): t for t in targets(summarise(recs))}
    assert got[("threads", "fan-out")]["met"] is True  # 0.5 >= 1/3
    assert got[("ray", "fan-out")]["met"] is False  # 0.5 < 5 (chunked)
    assert got[("ray", "chain")]["met"] is None  # no raw chain measured


def test_chunking_runtimes_must_win_and_coarse_work_must_not_lose() -> None:
    recs = [
        run("dask", "asyncflow", "fanout", 100, seconds=1.0),
        run("dask", "raw", "fanout", 100, seconds=6.0),
        run("dask", "asyncflow", "diamond", 100, seconds=1.0),
        run("dask", "raw", "diamond", 100, seconds=1.5),
        run("dask", "asyncflow", "chain", 100, seconds=1.0),
        run("dask", "raw", "chain", 100, seconds=2.5),
        run("dask", "asyncflow", "work100ms", 40, seconds=2.05),
        run("dask", "raw", "work100ms", 40, seconds=2.0),
        run("processes", "asyncflow", "diamond", 100, seconds=1.0),
        run("processes", "raw", "diamond", 100, seconds=1.0),
    ]
    got = {(t["backend"], t["target"].split()[0]): t for t in targets(summarise(recs))}
    assert got[("dask", "fan-out")]["met"] is True  # 6 >= 5
    assert got[("dask", "diamond")]["met"] is False  # 1.5 < 2
    assert got[("dask", "chain")]["met"] is True  # 0.4 <= 0.5
    assert got[("dask", "100")]["met"] is True  # 2.0 / 2.05 >= 0.97
    assert ("processes", "diamond") not in got  # no goal of its own there


def test_sizes_are_capped_and_fixed_counts_run_once() -> None:
    fanout, chain, sleep = (WORKLOADS[w] for w in ("fanout", "chain", "sleep"))
    assert fanout.sizes_for("dask", [1000, 10000], False) == ([1000, 10000], None)
    assert sleep.sizes_for("dask", [1000, 10000], False) == ([1000], None)
    sizes, why = chain.sizes_for("radical", [1000, 10000], False)
    assert sizes == [5, 50] and why and "10 tasks/s" in why  # growth still shows
    assert chain.sizes_for("radical", [1000], False)[0] == [50]
    assert chain.sizes_for("radical", [10, 1000], False)[0] == [10, 50]
    assert fanout.sizes_for("radical", [100], True)[0] == [12]
    sizes, why = WORKLOADS["mapreduce"].sizes_for("radical", [1000, 10000], False)
    assert sizes == [8] and why and "large_payloads" in why  # 0 maps: one size


def test_task_bodies_ship_by_value() -> None:
    import dill

    copy = by_value(nap)
    assert copy.__module__ == "__main__" and copy(3) == 3
    blob = dill.dumps(copy)
    assert b"asyncflow.bench" not in blob  # no import of asyncflow in the fork
    assert dill.loads(blob)(4) == 4
    with pytest.raises(pickle.PicklingError):
        pickle.dumps(copy)


def test_finish_fails_loudly_on_a_wrong_answer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("asyncflow.bench.plots.plot", lambda out, rows: [])
    recs = [
        run("threads", "asyncflow", "fanout", 10),
        run("threads", "raw", "fanout", 10),
        run("processes", "asyncflow", "fanout", 10, result=-1),
        {"kind": "startup", "backend": "threads", "side": "raw", "seconds": 0.1},
    ]
    meta = {"date": "today", "cores": 2, "memory_bytes": 2**31, "versions": {}}
    console = Console(stderr=True, record=True, width=200)
    assert _finish(tmp_path, meta, recs, [], [], console) == 1
    assert "CROSS-CHECK FAILED" in console.export_text()
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["startup"] == [{"backend": "threads", "side": "raw", "startup_s": 0.1}]
    md = (tmp_path / "bench.md").read_text()
    assert "| threads | fanout | 10 |" in md
    recs[2]["result"] = WORKLOADS["fanout"].expected(10)
    assert _finish(tmp_path, meta, recs, [], [], console) == 0
    assert _finish(tmp_path, meta, recs, [], ["ray: exited 1"], console) == 1


def test_plots_survive_missing_figures(tmp_path: Path) -> None:
    from asyncflow.bench.plots import plot

    rows = summarise([run("threads", "asyncflow", "sleep", 10)])  # no raw, no chain
    assert all(p.stat().st_size for p in plot(tmp_path, rows))


def test_markdown_states_machine_and_load() -> None:
    meta = {
        "date": "2026-01-01",
        "cores": 2,
        "memory_bytes": 24 * 2**30,
        "load_before": [1.5, 1, 1],
        "load_after": [2.0, 1, 1],
        "versions": {"ray": "2.60.0"},
    }
    text = markdown(meta, [], [], [], ["radical: chain capped"])
    assert "2 cores, 24 GiB" in text and "load average 1.5 before" in text
    assert "ray 2.60.0" in text and "- radical: chain capped" in text
    assert "Failed" not in text
    text = markdown(meta, [], [], [], [], ["dask asyncflow: chain 10000: hung\nTrace"])
    assert (
        "**Failed in this run**" in text
        and "- dask asyncflow: chain 10000: hung" in text
    )
    assert "Trace" not in text
