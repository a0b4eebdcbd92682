"""The documentation site: it builds with no warning, and its code is run.

``mkdocs build --strict`` fails on a broken link or anchor, a page missing from
the navigation, or an API page whose object moved.  Every fenced block on a
page is either checked here or carries ``<!-- not run: REASON -->`` right
before it, with the reason (a block that needs Dask, Ray, Parsl, radical.pilot
or Slurm: those are run by their own tests).  Checked means:

- ``python``: run in order, one namespace per page (as a script: ``__name__`` is
  ``"__main__"``), in a temp dir, blocks with top-level ``await`` awaited on one
  event loop per page, as the reference page's are in ``tests/page.py``.  What
  the page says a block prints is checked too (``PRINTS``).
- ``bash``: every command is an ``asyncflow`` command and parses with asyncflow's
  own command line (nothing runs), so a renamed or removed option fails here.
- ``toml``: parses.
"""

from __future__ import annotations

import ast
import asyncio
import inspect
import os
import re
import shlex
import subprocess
import sys
import textwrap
import threading
import time
import tomllib
import types
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from asyncflow import cli

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
FENCE = re.compile(
    r"^(?P<indent>[ ]*)```(?P<lang>[\w-]*)[^\n]*\n(?P<body>.*?)^(?P=indent)```[ ]*$",
    re.M | re.S,
)
MARK = re.compile(r"<!-- not run:(?P<why>.*?)-->")
CHECKED = {"python", "bash", "toml"}

#: what a page's blocks print, in order, as the page's comments say
PRINTS = {
    "index.md": ["285"],
    "getting-started.md": ["total=285", "128", "332833500"],
    "reference-workflows.md": ["Starting workflow 4", "Workflow 4 completed"],
    "semantics.md": [
        "ValueError in ('parse",
        "exit code 1",
        "timed out, and the sleep was killed",
    ],
    "backends/concurrent.md": ["2262"],
    "store.md": ["(1799994, 0)", "(1799994, 8)"],
    "migration.md": ["HELLO WORLD"],
    "cli.md": ["run.html"],
}

pytestmark = pytest.mark.timeout(120)


@dataclass(frozen=True)
class Block:
    page: str  # relative to docs/
    line: int
    lang: str
    source: str
    why_not_run: str | None  # the marker's reason, if the block is marked

    def __str__(self) -> str:
        return f"docs/{self.page}:{self.line} ({self.lang or 'no language'})"


def _nav_pages(node: Any) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, list):
        for item in node:
            yield from _nav_pages(item)
    elif isinstance(node, dict):
        for item in node.values():
            yield from _nav_pages(item)


def pages() -> list[str]:
    """The site's pages, as its navigation lists them (strict mode fails the
    build for a page left out)."""
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    return list(_nav_pages(config["nav"]))


def blocks(page: str) -> list[Block]:
    text = (DOCS / page).read_text()
    found = []
    for m in FENCE.finditer(text):
        before = text[: m.start()].rstrip().rsplit("\n", 1)[-1].strip()
        mark = MARK.fullmatch(before)
        found.append(
            Block(
                page=page,
                line=text.count("\n", 0, m.start()) + 1,
                lang=m["lang"],
                source=textwrap.dedent(m["body"]),
                why_not_run=mark["why"] if mark else None,
            )
        )
    return found


def all_blocks() -> list[Block]:
    return [b for page in pages() for b in blocks(page)]


def to_check(lang: str) -> list[Block]:
    return [b for b in all_blocks() if b.lang == lang and b.why_not_run is None]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The site, built once with ``mkdocs build --strict``."""
    out = tmp_path_factory.mktemp("site")
    started = time.monotonic()
    build = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", out],
        cwd=ROOT,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        capture_output=True,
        text=True,
        timeout=100,
    )
    log = build.stdout + build.stderr
    assert build.returncode == 0, log
    assert "WARNING" not in log, log
    print(f"site built in {time.monotonic() - started:.1f} s")
    return out


def test_site_builds_strictly(site: Path) -> None:
    assert (site / "index.html").is_file()
    for page in pages():
        html = site / Path(page).with_suffix("") / "index.html"
        if page.endswith("index.md"):
            html = site / Path(page).parent / "index.html"
        assert html.is_file(), f"{page} was not built"
    api = (site / "api" / "engine" / "index.html").read_text()
    assert "WorkflowEngine" in api and "export_trace" in api
    assert ":class:" not in api, "a Sphinx role reached the page verbatim"


def test_every_block_is_checked_or_says_why_not() -> None:
    every = all_blocks()
    assert len(every) > 20
    for block in every:
        if block.why_not_run is not None:
            assert block.why_not_run.strip(), f"{block}: 'not run' without a reason"
        else:
            assert block.lang in CHECKED, (
                f"{block}: nothing checks a {block.lang!r} block; check it here "
                "or mark it <!-- not run: REASON -->"
            )


def _threads_gone(before: set[int | None], grace: float = 5.0) -> list[str]:
    deadline = time.monotonic() + grace
    while True:
        left = [t.name for t in threading.enumerate() if t.ident not in before]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


def run_python(sources: list[str], filename: str) -> None:
    """Run a page's blocks in order in one namespace, as a script would; blocks
    with top-level ``await`` run on one loop, kept for the whole page."""
    namespace: dict[str, Any] = {"__name__": "__main__"}
    loop = asyncio.new_event_loop()
    try:
        for source in sources:
            code = compile(
                source, filename, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT
            )
            result = types.FunctionType(code, namespace)()
            if inspect.iscoroutine(result):
                loop.run_until_complete(result)
    finally:
        loop.close()


PYTHON_PAGES = sorted({b.page for b in to_check("python")})


@pytest.mark.timeout(90)
@pytest.mark.parametrize("page", PYTHON_PAGES)
def test_python_blocks_run(
    page: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for name in ("ASYNCFLOW_BACKEND", "ASYNCFLOW_BACKEND_OPTIONS", "ASYNCFLOW_STORE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    before = {t.ident for t in threading.enumerate()}
    sources = [
        b.source for b in blocks(page) if b.lang == "python" and not b.why_not_run
    ]
    run_python(sources, str(DOCS / page))
    out = capsys.readouterr().out
    position = 0
    for expected in PRINTS.get(page, []):
        found = out.find(expected, position)
        assert found >= 0, f"docs/{page} should print {expected!r}; it printed\n{out}"
        position = found + len(expected)
    assert not _threads_gone(before), f"docs/{page} left threads running"


def test_every_page_that_prints_is_run() -> None:
    assert set(PRINTS) <= set(PYTHON_PAGES)


def _commands(source: str) -> Iterator[list[str]]:
    """Each command of a shell block, split as the shell would split it."""
    for line in source.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        words: list[str] = []
        for token in [*lexer, ";"]:
            if token in ("&&", "||", ";"):
                if words:
                    yield words
                words = []
            else:
                words.append(token)


def parse_command(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Parse ``asyncflow ARGS`` with asyncflow's own ``main``, every subcommand's
    work stubbed out: only the command line is checked."""
    from asyncflow import bench

    if argv[:1] == ["bench"]:
        bench._parse(argv[1:])
        return
    for name in ("cmd_run", "cmd_backends", "cmd_plot", "cmd_store", "cmd_bench"):
        monkeypatch.setattr(cli, name, lambda ns: 0)
    monkeypatch.setattr(cli, "_configure_logging", lambda level: None)
    try:
        assert cli.main(argv) == 0
    except SystemExit as exc:  # --help exits 0 after printing
        assert exc.code == 0, f"asyncflow {shlex.join(argv)}: exit status {exc.code}"


@pytest.mark.timeout(30)
def test_shell_blocks_parse(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    checked = 0
    for block in to_check("bash"):
        for words in _commands(block.source):
            assert words[0] == "asyncflow", (
                f"{block}: {shlex.join(words)!r} is not an asyncflow command; "
                "mark the block <!-- not run: REASON -->"
            )
            try:
                parse_command(words[1:], monkeypatch)
            except SystemExit as exc:
                err = capsys.readouterr().err
                pytest.fail(f"{block}: {shlex.join(words)} does not parse:\n{err}")
                raise AssertionError from exc
            checked += 1
    assert checked > 20


def test_toml_blocks_parse() -> None:
    for block in to_check("toml"):
        tomllib.loads(block.source)


def test_the_adapter_page_shows_the_example_adapters_entry_point() -> None:
    (shown,) = [
        tomllib.loads(b.source) for b in blocks("adapters.md") if b.lang == "toml"
    ]
    real = tomllib.loads((ROOT / "tests/example_adapter/pyproject.toml").read_text())
    group = shown["project"]["entry-points"]["asyncflow.backends"]
    assert group == real["project"]["entry-points"]["asyncflow.backends"]


def test_the_benchmark_tables_are_the_runs() -> None:
    """``docs/choosing.md`` holds exactly ``docs/bench/bench.md``, as
    ``benchmarks/bench_readme.py`` splices it: a hand edit of a figure fails."""
    check = subprocess.run(
        [sys.executable, ROOT / "benchmarks" / "bench_readme.py", "--check"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert check.returncode == 0, check.stdout + check.stderr


def test_the_readme_is_a_front_page_into_the_site() -> None:
    """README.md keeps the two commands CI and a new user run, as the site's
    getting-started page has them, and every link it has leads to a file."""
    readme = (ROOT / "README.md").read_text()
    started = (DOCS / "getting-started.md").read_text()
    for command in (
        "python3 -m venv .venv && .venv/bin/pip install -e '.[all]' && "
        ".venv/bin/python examples/page_workflow.py",
        "bash ci/test.sh",
        "asyncflow run --backend ray wf.py",
    ):
        assert f"\n{command}" in readme and f"\n{command}" in started, command
    assert "exec bash ci/test.sh" in (ROOT / ".ci" / "run").read_text()
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", readme)
    local = [link for link in links if "://" not in link]
    assert len(local) >= 8
    for link in local:
        assert (ROOT / link).exists(), f"README.md links to a missing {link}"


@pytest.mark.timeout(120)
def test_the_front_page_in_chromium(site: Path, tmp_path: Path) -> None:
    """The built site's front page in a real headless Chromium, opened from
    disk with no network: no console error, nothing fetched from outside, the
    navigation and the example there, and a screenshot that is not blank."""
    from .browser import Browser, distinct_colours, need_browser

    need_browser()
    with Browser(width=1400, height=900) as browser:
        page = browser.open(
            site / "index.html", ready="document.querySelector('.md-content h1')"
        )
        assert not page.errors, page.errors
        assert not page.blocked, page.blocked
        assert page.evaluate("document.title") == "asyncflow"
        nav = page.evaluate(
            "[...document.querySelectorAll('.md-nav--primary .md-nav__link')]"
            ".map(a => a.textContent.trim())"
        )
        for title in ("Getting started", "Semantics", "Backends", "API reference"):
            assert title in nav, nav
        code = page.evaluate("document.querySelector('pre code').textContent")
        assert "WorkflowEngine()" in code
        png = page.screenshot(tmp_path / "front.png")
    assert distinct_colours(png) > 16


@pytest.mark.timeout(60)
def test_the_main_job_runs(tmp_path: Path) -> None:
    """The script the front page's first command ends with: the reference
    page's five workflows, on the embedded default."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ASYNCFLOW_")}
    done = subprocess.run(
        [sys.executable, ROOT / "examples" / "page_workflow.py"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=50,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("completed at") == 5, done.stdout
    assert "Total time running asynchronously is" in done.stdout
