"""``asyncflow run`` switches backends with no code change; traces, plots,
signals and exit codes behave."""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.timeout(180)

SCRIPT = textwrap.dedent("""
    import asyncio, sys
    from asyncflow import WorkflowEngine

    async def main():
        flow = WorkflowEngine()
        (backend,) = flow.backends.values()
        print("backend:", backend.info.name)

        @flow.function_task
        def square(x):
            return x * x

        @flow.executable_task
        def echo(x):
            return ["echo", str(x)]

        total = sum(await asyncio.gather(*[square(i) for i in range(10)]))
        print("result:", (await echo(total)).strip())
        await flow.shutdown()

    if __name__ == "__main__":
        asyncio.run(main())
""")


def asyncflow(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "asyncflow", *args],
        capture_output=True,
        text=True,
        timeout=150,
        env={**os.environ, **(env or {})},
        cwd=cwd,
    )


@pytest.fixture
def script(tmp_path: Path) -> Path:
    path = tmp_path / "wf.py"
    path.write_text(SCRIPT)
    return path


def test_run_switches_backend_with_the_flag_only(script: Path) -> None:
    plain = asyncflow("run", str(script))
    assert plain.returncode == 0, plain.stderr
    assert "backend: concurrent-threads" in plain.stdout
    assert "result: 285" in plain.stdout
    procs = asyncflow(
        "run",
        "--backend",
        "processes",
        "--backend-option",
        "max_workers=2",
        str(script),
    )
    assert procs.returncode == 0, procs.stderr
    assert "backend: concurrent-processes" in procs.stdout
    assert "result: 285" in procs.stdout


def test_precedence_code_then_cli_then_environment(
    tmp_path: Path, script: Path
) -> None:
    env = {"ASYNCFLOW_BACKEND": "processes"}
    assert "concurrent-processes" in asyncflow("run", str(script), env=env).stdout
    cli = asyncflow("run", "--backend", "threads", str(script), env=env)
    assert "concurrent-threads" in cli.stdout
    explicit = tmp_path / "explicit.py"
    explicit.write_text(
        SCRIPT.replace(
            "WorkflowEngine()",
            "WorkflowEngine(backend=__import__('asyncflow').ConcurrentExecutionBackend())",
        )
    )
    code = asyncflow("run", "--backend", "processes", str(explicit), env=env)
    assert "concurrent-threads" in code.stdout


def test_exit_code_and_stderr_pass_through(tmp_path: Path) -> None:
    failing = tmp_path / "fail.py"
    failing.write_text("import sys\nprint('oops', file=sys.stderr)\nsys.exit(3)\n")
    result = asyncflow("run", str(failing))
    assert result.returncode == 3 and "oops" in result.stderr
    crashing = tmp_path / "crash.py"
    crashing.write_text("raise ValueError('bad input')\n")
    result = asyncflow("run", str(crashing))
    assert result.returncode == 1 and "ValueError: bad input" in result.stderr


def test_trace_and_gantt(tmp_path: Path, script: Path) -> None:
    trace = tmp_path / "run.json"
    result = asyncflow("run", "--trace", str(trace), str(script))
    assert result.returncode == 0, result.stderr
    events = json.loads(trace.read_text())["traceEvents"]
    complete = [e for e in events if e["ph"] == "X"]
    assert len(complete) == 11
    assert len({e["args"]["uid"] for e in complete}) == 11
    png = tmp_path / "gantt.png"
    plot = asyncflow("plot", str(trace), "-o", str(png))
    assert plot.returncode == 0, plot.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_backends_lists_install_state_and_capabilities() -> None:
    out = asyncflow("backends").stdout
    for name in ("threads", "processes", "dask", "ray", "parsl", "radical"):
        assert name in out
    assert "kill_executables" in out


def test_backends_shows_version_and_capabilities_of_an_out_of_tree_adapter() -> None:
    """An adapter from another distribution shows that distribution's version
    and the capabilities its class declares, like the in-tree ones."""
    result = asyncflow("backends")
    assert result.returncode == 0, result.stderr
    rows = {
        cells[0]: cells
        for cells in (
            re.split(r"\s{2,}", line.strip()) for line in result.stdout.splitlines()
        )
    }
    assert rows["asyncio-example"] == [
        "asyncio-example",
        "yes",
        md.version("asyncflow-example-adapter"),
        "cancel_queued, executables, functions, kill_executables, large_payloads, "
        "parallel, resources",
    ]


def test_log_level_configures_only_the_asyncflow_logger(tmp_path: Path) -> None:
    check = tmp_path / "log.py"
    check.write_text("import logging\nprint('root', logging.getLogger().handlers)\n")
    result = asyncflow("--log-level", "DEBUG", "run", str(check))
    assert "root []" in result.stdout


HANGING = textwrap.dedent("""
    import asyncio, sys
    from asyncflow import WorkflowEngine

    async def main():
        flow = WorkflowEngine()

        @flow.executable_task
        def hold(fifo):
            return f"echo $$ > {fifo}; exec sleep 301.25"  # its pid, then sleep

        await hold(sys.argv[1])

    if __name__ == "__main__":
        asyncio.run(main())
""")


def _held_processes() -> list[psutil.Process]:
    """Every ``sleep 301.25`` on the machine (tests/reliability filters them)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if "301.25" in " ".join(proc.info["cmdline"] or []):
            found.append(proc)
    return found


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
@pytest.mark.parametrize("backend", ["threads", "processes"])
def test_signals_leave_nothing_running(
    tmp_path: Path, sig: int, code: int, backend: str
) -> None:
    script = tmp_path / "hang.py"
    script.write_text(HANGING)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "asyncflow",
            "run",
            "--backend",
            backend,
            str(script),
            str(fifo),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    reported: list[int] = []
    started = threading.Event()

    def wait_for_task() -> None:
        with open(fifo) as f:  # returns once the task has written its pid
            reported.append(int(f.read()))
        started.set()

    threading.Thread(target=wait_for_task, daemon=True).start()
    held = None
    try:
        assert started.wait(60), "the task never started"
        # The shell wrote its pid, then exec'd into sleep under that same pid:
        # whichever it is now, this is the held command (no /proc race).
        held = psutil.Process(reported[0])
        assert held.is_running(), "the held command is running"
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == code, err
        _, alive = psutil.wait_procs([held], timeout=10)
        assert not alive, f"left running after {signal.Signals(sig).name}: {alive}"
    finally:  # a failure above must not leave this run's driver or command behind
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        if held is not None and held.is_running():
            held.kill()


def test_progress_is_quiet_when_stdout_is_not_a_terminal(script: Path) -> None:
    result = asyncflow("run", "--progress", str(script))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["backend: concurrent-threads", "result: 285"]


def test_progress_display_counts_states() -> None:
    from asyncflow.events import EventKind, TaskEvent
    from asyncflow.progress import ProgressDisplay

    display = ProgressDisplay()
    for kind in ("created", "submitted", "done"):
        display(TaskEvent(0.0, EventKind(kind), "a", "a", "b", 0))
    display(TaskEvent(0.0, EventKind.CREATED, "b", "b", "b", 0))
    task = display._progress.tasks[0]
    assert (task.completed, task.total) == (1, 2)
    for kind in ("cached", "done"):  # found in the result store
        display(TaskEvent(0.0, EventKind(kind), "b", "b", "b", 0))
    assert (task.completed, task.total) == (2, 2)
    assert "done 2" in str(task.description) and "cached 1" in str(task.description)


def test_run_on_dask_with_the_flag_only(script: Path) -> None:
    pytest.importorskip("distributed")
    result = asyncflow("run", "--backend", "dask", str(script))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "backend: dask" in result.stdout
    assert "result: 285" in result.stdout


def test_asyncflow_options_after_the_script_are_an_error(tmp_path: Path) -> None:
    echo = tmp_path / "echo_args.py"
    echo.write_text("import sys\nprint(sys.argv[1:])\n")
    late = asyncflow("run", str(echo), "--backend", "ray")
    assert late.returncode == 2
    assert "put it first" in late.stderr and "--backend" in late.stderr
    passed = asyncflow("run", str(echo), "--n", "3", "--", "--backend", "ray")
    assert passed.returncode == 0, passed.stderr
    assert passed.stdout.strip() == "['--n', '3', '--backend', 'ray']"


def test_plot_names_a_missing_or_foreign_trace(tmp_path: Path) -> None:
    missing = asyncflow("plot", str(tmp_path / "missing.json"))
    assert missing.returncode == 2 and "no trace file" in missing.stderr
    assert "Traceback" not in missing.stderr
    foreign = tmp_path / "foreign.json"
    foreign.write_text('{"x": 1}')
    bad = asyncflow("plot", str(foreign))
    assert bad.returncode == 2 and "is not a trace" in bad.stderr
