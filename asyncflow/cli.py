"""The ``asyncflow`` command: run a script on any backend, list backends, plot
traces, benchmark runtimes.

``asyncflow run wf.py --backend dask`` switches runtime with no code change: it
sets ``ASYNCFLOW_BACKEND`` (and ``ASYNCFLOW_BACKEND_OPTIONS``), so every
``WorkflowEngine()`` created without an explicit backend uses it.  Precedence,
strongest first: a backend passed in code, then the command line, then the
environment.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import runpy
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .engine import WorkflowEngine
    from .progress import ProgressDisplay
    from .registry import BackendStatus

__all__ = ["main"]

log = logging.getLogger("asyncflow")


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so asyncio unwinds and engines shut down."""


def _parse_option(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw  # plain strings need no quotes
    return key, value


def _configure_logging(level: str | None) -> None:
    if not level:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    log.addHandler(handler)
    log.setLevel(level.upper())


def cmd_run(ns: argparse.Namespace) -> int:
    from .engine import creation_hooks

    _export_backend_choice(ns)
    engines: list[WorkflowEngine] = []
    progress = None
    if ns.progress and sys.stdout.isatty():
        from .progress import ProgressDisplay

        progress = ProgressDisplay()

    def attach(engine: WorkflowEngine) -> None:
        engines.append(engine)
        if ns.trace or ns.report:
            engine.record_trace()
        if progress is not None:
            engine.subscribe(progress)

    creation_hooks.append(attach)
    previous = signal.signal(signal.SIGTERM, _sigterm_handler(engines))
    sys.argv = [ns.script, *ns.args]
    sys.path.insert(0, os.path.dirname(os.path.abspath(ns.script)))
    code = None
    try:
        code = _run_script(ns.script, progress)
        return code
    finally:
        signal.signal(signal.SIGTERM, previous)
        creation_hooks.remove(attach)
        if progress is not None:
            progress.stop()
        if ns.trace:
            _write_trace(engines, ns.trace)
        if ns.report:
            _write_report(engines, ns.report, code)


def _export_backend_choice(ns: argparse.Namespace) -> None:
    """The command line's choice, in the environment every engine the script
    creates reads; options add to those the environment already held."""
    if ns.backend:
        os.environ["ASYNCFLOW_BACKEND"] = ns.backend
    if ns.store:
        os.environ["ASYNCFLOW_STORE"] = os.path.abspath(ns.store)
    if ns.refresh:
        os.environ["ASYNCFLOW_REFRESH"] = "1"
    if ns.hpc:
        text = ns.hpc if ns.hpc.lstrip().startswith("{") else Path(ns.hpc).read_text()
        os.environ["ASYNCFLOW_HPC"] = text
    if ns.backend_option:
        options = json.loads(os.environ.get("ASYNCFLOW_BACKEND_OPTIONS") or "{}")
        options.update(dict(ns.backend_option))
        os.environ["ASYNCFLOW_BACKEND_OPTIONS"] = json.dumps(options)


def _sigterm_handler(engines: Sequence[WorkflowEngine]) -> Callable[[int, Any], None]:
    """SIGTERM between engines; marked so that an engine's loop takes the signal
    over while it runs (see :mod:`asyncflow._signals`)."""
    from . import _signals

    def on_sigterm(signum: int, frame: object) -> None:
        # While an engine's loop runs, the loop handles SIGTERM itself (see
        # asyncflow._signals) and this handler is not installed.  Outside it,
        # with no engine left open, there is nothing to shut down: exit now, as
        # Python's default would, rather than raise an exception that a gc
        # callback or __del__ could swallow.
        if not any(not engine.closed for engine in engines):
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(_signals.EXIT_CODE)
        raise Terminated()

    on_sigterm._asyncflow_sigterm = True  # type: ignore[attr-defined]
    return on_sigterm


def _run_script(path: str, progress: ProgressDisplay | None) -> int:
    """The script's exit status, as the shell reports it for a Python script run
    directly: 130 after Ctrl-C, 143 after SIGTERM, a non-integer exit message
    printed and status 1."""
    try:
        if progress is not None:
            progress.start()
        runpy.run_path(path, run_name="__main__")
    except KeyboardInterrupt:
        return 130
    except Terminated:
        return 143
    except SystemExit as exc:
        if not isinstance(exc.code, int | None):
            print(exc.code, file=sys.stderr)
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return 0


def _write_trace(engines: Sequence[Any], path: str) -> None:
    from .events import merge_traces

    recorders = [e._recorder for e in engines if e._recorder is not None]
    with open(path, "w") as f:
        json.dump(merge_traces(recorders), f)
    print(
        f"asyncflow: trace of {len(recorders)} engine(s) written to {path}",
        file=sys.stderr,
    )


def _write_report(engines: Sequence[Any], path: str, code: int | None) -> None:
    """Written however the script ended; a report that cannot be written is
    said so on stderr, never raised over the script's own exception."""
    from .report_html import engines_report, outcome

    note = outcome(code, sys.exception())
    try:
        engines_report(path, engines, note)
    except Exception as exc:
        print(f"asyncflow: report not written: {exc!r}", file=sys.stderr)
        return
    print(
        f"asyncflow: report of {len(engines)} engine(s) written to {path}",
        file=sys.stderr,
    )


def cmd_backends(ns: argparse.Namespace) -> int:
    from .registry import available_backends

    header = ("name", "installed", "version", "capabilities")
    _print_table(header, [_backend_row(s) for s in available_backends()])
    return 0


def _backend_row(status: BackendStatus) -> tuple[str, str, str, str]:
    """One backend as ``asyncflow backends`` shows it; "-" where unknown."""
    from .registry import capabilities_of

    if not status.installed:
        return (status.name, f"no ({status.install_hint})", status.version or "-", "-")
    caps = capabilities_of(status.name)
    supported = ", ".join(sorted(c.value for c in caps.supported)) if caps else "-"
    return (status.name, "yes", status.version or "-", supported)


def _print_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    """Columns padded to their widest cell, the header's included."""
    table = [header, *rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))


def cmd_store(ns: argparse.Namespace) -> int:
    from .store import ResultStore

    if not Path(ns.path, "index.sqlite").exists():
        print(f"asyncflow store: no result store at {ns.path!r}", file=sys.stderr)
        return 2
    store = ResultStore(ns.path)
    if ns.action == "ls":
        counts: dict[str, list[int]] = {}
        for row in store:
            entry = counts.setdefault(row.task, [0, 0])
            entry[0] += 1
            entry[1] += row.size
        for task, (n, size) in sorted(counts.items()):
            print(f"{task:<40} {n:>8} results {size / 2**20:>10.1f} MiB")
        print(f"{len(store)} results, {store.size() / 2**20:.1f} MiB on disk")
        return 0
    if ns.task is None and ns.older_than is None:
        print(
            "asyncflow store prune: say what: --task NAME and/or --older-than DAYS",
            file=sys.stderr,
        )
        return 2
    age = None if ns.older_than is None else ns.older_than * 86400
    print(f"pruned {store.prune(older_than=age, task=ns.task)} results")
    return 0


def cmd_plot(ns: argparse.Namespace) -> int:
    from .plot import gantt

    try:
        out = gantt(ns.trace, ns.output)
    except FileNotFoundError:
        print(
            f"asyncflow plot: no trace file {ns.trace!r}; write one with "
            "`asyncflow run --trace FILE wf.py`",
            file=sys.stderr,
        )
        return 2
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(
            f"asyncflow plot: {ns.trace!r} is not a trace asyncflow wrote "
            f"({type(exc).__name__}: {exc})",
            file=sys.stderr,
        )
        return 2
    print(f"asyncflow: Gantt chart written to {out}", file=sys.stderr)
    return 0


def cmd_bench(ns: argparse.Namespace) -> int:
    from .bench import main as bench_main

    return bench_main(ns.bench_args)


#: ``asyncflow run``'s own options, which after the script name would go to the
#: script without a word
_RUN_OPTIONS = (
    "--backend",
    "--backend-option",
    "--hpc",
    "--trace",
    "--report",
    "--progress",
    "--store",
    "--refresh",
)


def _script_args(
    parser: argparse.ArgumentParser, script: str, args: list[str]
) -> list[str]:
    """The script's arguments before any ``--``: asyncflow's own options among
    them are a mistake (after ``--`` they are the script's)."""
    for arg in args:
        if arg.split("=", 1)[0] in _RUN_OPTIONS:
            parser.error(
                f"{arg} comes after the script, so it would go to {script}, not to "
                f"asyncflow; put it first (asyncflow run {arg} ... {script}), or "
                f"write `asyncflow run {script} -- {arg}` to pass it to the script"
            )
    return args


def build_parser() -> argparse.ArgumentParser:

    parser = argparse.ArgumentParser(
        prog="asyncflow", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--log-level",
        help="level of the 'asyncflow' logger "
        "(DEBUG, INFO, ...); the root logger is never touched",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_run(sub.add_parser("run", help="run a workflow script on a chosen backend"))
    _add_store(sub.add_parser("store", help="list or prune a result store"))

    backends = sub.add_parser("backends", help="list backends, installed or not")
    backends.set_defaults(func=cmd_backends)

    plot = sub.add_parser("plot", help="draw a Gantt chart from a trace file")
    plot.add_argument("trace")
    plot.add_argument("-o", "--output", default="gantt.png")
    plot.set_defaults(func=cmd_plot)

    bench = sub.add_parser(
        "bench",
        add_help=False,
        help="compare runtimes on the same workloads (asyncflow bench --help)",
    )
    bench.add_argument("bench_args", nargs=argparse.REMAINDER)
    bench.set_defaults(func=cmd_bench)
    return parser


def _add_run(run: argparse.ArgumentParser) -> None:
    from .registry import batch_names

    run.add_argument("--backend", help="backend name, see `asyncflow backends`")
    run.add_argument(
        "--backend-option",
        action="append",
        type=_parse_option,
        default=[],
        metavar="KEY=VALUE",
        help="backend constructor option (value parsed as JSON if "
        "it can be), repeatable",
    )
    run.add_argument(
        "--hpc",
        metavar="JSON|FILE",
        help='the reference page\'s HPC allocation, e.g. \'{"resource": "slurm", '
        '"queue": "debug", "nodes": 2, "walltime": 30}\', or a file '
        f"holding it; for {batch_names()}",
    )
    run.add_argument(
        "--trace", metavar="FILE", help="write a Chrome trace-event JSON of every task"
    )
    run.add_argument(
        "--report",
        metavar="FILE",
        help="write a self-contained HTML report (DAG, timeline, critical path, "
        "utilisation, failures), also when the run fails or is interrupted",
    )
    run.add_argument(
        "--store",
        metavar="PATH",
        help="result store: tasks stored there do not run again, and every task "
        "that succeeds is stored (see asyncflow store)",
    )
    run.add_argument(
        "--refresh",
        action="store_true",
        help="with --store: run every task, and store the results again",
    )
    run.add_argument(
        "--progress",
        action="store_true",
        help="live progress bar (only when stdout is a terminal)",
    )
    run.add_argument("script")
    run.add_argument("args", nargs=argparse.REMAINDER)
    run.set_defaults(func=cmd_run)


def _add_store(store: argparse.ArgumentParser) -> None:
    store.add_argument("action", choices=["ls", "prune"])
    store.add_argument("path", metavar="PATH")
    store.add_argument("--task", help="prune: only the results of this task name")
    store.add_argument(
        "--older-than",
        type=float,
        metavar="DAYS",
        help="prune: only results stored more than DAYS days ago",
    )
    store.set_defaults(func=cmd_store)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["bench"]:  # bench owns its whole option set
        from .bench import main as bench_main

        return bench_main(args[1:])
    parser = build_parser()
    passed: list[str] = []
    if args[:1] == ["run"] and "--" in args:  # argparse would drop the "--"
        cut = args.index("--")
        args, passed = args[:cut], args[cut + 1 :]
    ns = parser.parse_args(args)
    if ns.command == "run":
        ns.args = [*_script_args(parser, ns.script, ns.args), *passed]
    _configure_logging(ns.log_level)
    result: int = ns.func(ns)
    return result


if __name__ == "__main__":
    sys.exit(main())
