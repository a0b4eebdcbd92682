"""The conformance plugin fails loudly instead of silently collecting nothing,
judges only the classes a run selected, and stays out of unrelated projects."""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]

HEADER = """
import pytest
from asyncflow import ConcurrentExecutionBackend
from asyncflow.conformance import BackendFixtures, ConformanceSuite, FunctionTests
"""


def test_adapter_class_without_mixins_is_an_error(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        HEADER
        + """
class TestForgotTheMixins(BackendFixtures):
    @pytest.fixture
    def backend(self):
        return ConcurrentExecutionBackend()
"""
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*collected zero tests*TestForgotTheMixins*"])


def test_uncollectable_class_name_is_an_error(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        HEADER
        + """
class MyAdapterSuite(BackendFixtures, ConformanceSuite):
    @pytest.fixture
    def backend(self):
        return ConcurrentExecutionBackend()
"""
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*zero tests*MyAdapterSuite*starts with*Test*"])


def test_missing_backend_fixture_override_fails(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        HEADER
        + """
class TestNoOverride(BackendFixtures, FunctionTests):
    pass
"""
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-x")
    assert result.ret != pytest.ExitCode.OK
    result.stdout.fnmatch_lines(["*must override the `backend` fixture*"])


def test_header_and_summary_name_the_adapter(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        HEADER
        + """
class TestThreads(BackendFixtures, FunctionTests):
    @pytest.fixture
    def backend(self):
        return ConcurrentExecutionBackend()
"""
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    passed = result.parseoutcomes()["passed"]
    result.assert_outcomes(passed=passed)
    result.stdout.fnmatch_lines(
        [
            "asyncflow backends installed: threads*",
            "*asyncflow conformance*",
            f"concurrent-threads (concurrent.futures.ThreadPoolExecutor *): {passed} "
            "passed",
        ]
    )


def adapters(*classes: str, marks: dict[str, str] | None = None) -> str:
    """A test module with these adapter classes, each with two tests of its own
    (so the counts do not follow the suite); a name ending in ``!`` forgets the
    mixins and has no test."""
    source = HEADER
    for name in classes:
        empty = name.endswith("!")
        tests = (
            ""
            if empty
            else "    def test_one(self): pass\n    def test_two(self): pass"
        )
        mark = (marks or {}).get(name.rstrip("!"))
        source += f"""
{f"@pytest.mark.{mark}" if mark else ""}
class {name.rstrip("!")}(BackendFixtures):
    @pytest.fixture
    def backend(self):
        return ConcurrentExecutionBackend()
{tests}
"""
    return source


def test_selecting_one_class_by_node_id_runs_it(pytester: pytest.Pytester) -> None:
    """The other classes of the file, empty or not, were not selected."""
    path = pytester.makepyfile(adapters("TestThreads", "TestOther", "TestEmpty!"))
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", f"{path.name}::TestThreads"
    )
    result.assert_outcomes(passed=2)
    one = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", f"{path.name}::TestThreads::test_two"
    )
    one.assert_outcomes(passed=1)


@pytest.mark.parametrize(
    "args",
    [["-k", "Threads"], ["-k", "not Other and not Empty"], ["-m", "not slow"]],
    ids=["k", "k-not", "m"],
)
def test_keyword_and_mark_selection_judge_only_selected_classes(
    pytester: pytest.Pytester, args: list[str]
) -> None:
    pytester.makeini("[pytest]\nmarkers =\n    slow: slow\n")
    pytester.makepyfile(
        adapters(
            "TestThreads",
            "TestOther",
            "TestEmpty!",
            marks={"TestOther": "slow", "TestEmpty": "slow"},
        )
    )
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "--collect-only", "-q", *args
    )
    assert result.ret == pytest.ExitCode.OK, result.stderr.str()
    result.stdout.fnmatch_lines(["2/4 tests collected (2 deselected)*"])


def test_deselection_hooks_and_option_are_respected(pytester: pytest.Pytester) -> None:
    path = pytester.makepyfile(adapters("TestThreads", "TestOther", "TestDropped"))
    pytester.makeconftest(
        """
def pytest_collection_modifyitems(config, items):
    gone = [i for i in items if i.cls.__name__ == "TestOther"]
    config.hook.pytest_deselected(items=gone)
    items[:] = [i for i in items if i not in gone]
"""
    )
    result = pytester.runpytest_subprocess(
        "-p",
        "no:cacheprovider",
        "--collect-only",
        "-q",
        f"--deselect={path.name}::TestDropped",
    )
    assert result.ret == pytest.ExitCode.OK, result.stderr.str()
    result.stdout.fnmatch_lines(["2/6 tests collected (4 deselected)*"])


@pytest.mark.parametrize("how", ["node-id", "keyword", "whole-file"])
def test_a_selected_class_without_tests_still_fails(
    pytester: pytest.Pytester, how: str
) -> None:
    path = pytester.makepyfile(adapters("TestThreads", "TestEmpty!"))
    args = {
        "node-id": [f"{path.name}::TestEmpty"],
        "keyword": ["-k", "Empty"],
        "whole-file": [],
    }[how]
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*collected zero tests*::TestEmpty"])


def test_misnamed_class_fails_only_when_its_file_runs_whole(
    pytester: pytest.Pytester,
) -> None:
    path = pytester.makepyfile(adapters("TestThreads", "MisnamedSuite"))
    whole = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--collect-only")
    assert whole.ret == pytest.ExitCode.USAGE_ERROR
    whole.stderr.fnmatch_lines(["*zero tests*MisnamedSuite*starts with*Test*"])
    narrowed = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "--collect-only", f"{path.name}::TestThreads"
    )
    assert narrowed.ret == pytest.ExitCode.OK, narrowed.stderr.str()


# -- the plugin in projects that do not test an adapter ----------------------------

SUITE_MODULES = [
    "psutil",
    "pytest_timeout",
    "asyncflow.conformance.suite_core",
    "asyncflow.conformance.suite_pipeline",
    "asyncflow.conformance.suite_runtime",
    "asyncflow.conformance.tasks",
    "distributed",
    "ray",
    "parsl",
    "radical",
]


def test_loading_the_plugin_imports_no_suite_and_no_runtime() -> None:
    """pytest imports the plugin in every project; the suite comes with the
    first conformance class, not before."""
    code = textwrap.dedent(
        """
        import json, sys
        import asyncflow.conformance.plugin
        before = sorted(sys.modules)
        from asyncflow.conformance import ConformanceSuite
        print(json.dumps([before, sorted(sys.modules)]))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    before, after = json.loads(out)
    assert [m for m in SUITE_MODULES if m in before] == []
    assert "asyncflow.conformance.suite_core" in after  # lazy, not missing


def _dists_for_a_bare_install() -> list[str]:
    """cloudpickle (asyncflow's one dependency) and pytest with what it needs
    here, pinned to the versions of this environment so pip's cache serves them."""
    names = {"cloudpickle", "pytest"}
    for req in map(Requirement, md.requires("pytest") or []):
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            names.add(req.name)
    return sorted(f"{name}=={md.version(name)}" for name in names)


@pytest.mark.timeout(120)
def test_bare_install_leaves_an_unrelated_project_alone(tmp_path: Path) -> None:
    """``pip install asyncflow`` without extras (so no psutil, no pytest-timeout,
    no runtime), then pytest in a project that never heard of asyncflow: the
    plugin loads, stays silent and changes nothing."""
    src = tmp_path / "src"
    for name in ("pyproject.toml", "README.md"):
        src.mkdir(exist_ok=True)
        shutil.copy(REPO / name, src / name)
    for name in ("asyncflow", "adapters", "conformance"):
        shutil.copytree(
            REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__")
        )
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    python = venv / "bin" / "python"
    install = ["install", "-q", "--no-deps", str(src), *_dists_for_a_bare_install()]
    pip = subprocess.run(
        [sys.executable, "-m", "pip", "--python", python, *install],
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert pip.returncode == 0, pip.stdout + pip.stderr
    project = tmp_path / "project"
    project.mkdir()
    (project / "pyproject.toml").write_text(
        '[tool.pytest.ini_options]\naddopts = "--strict-markers --strict-config"\n'
        'filterwarnings = ["error"]\n'
    )
    (project / "test_unrelated.py").write_text(
        textwrap.dedent(
            f"""
            import sys

            def test_plugin_is_loaded_and_idle(pytestconfig):
                assert pytestconfig.pluginmanager.has_plugin("asyncflow-conformance")
                assert [m for m in {SUITE_MODULES!r} if m in sys.modules] == []

            def test_arithmetic():
                assert 1 + 1 == 2
            """
        )
    )
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "PYTHON"))
    }
    run = subprocess.run(
        [python, "-m", "pytest", "-W", "error", "-rA"],
        capture_output=True,
        text=True,
        cwd=project,
        env=env,
        timeout=60,
    )
    output = run.stdout + run.stderr
    assert run.returncode == 0, output
    assert "2 passed" in output
    mentions = [
        line
        for line in output.splitlines()
        if "asyncflow" in line.lower() and not line.startswith("plugins:")
    ]
    assert mentions == [], output
    assert "warning" not in output.lower(), output
