"""The wheel holds the whole package.  The work tree is built into a wheel,
installed (not editable) into a fresh virtualenv, and imported and tested there
from a directory outside the repository, so that a subpackage missing from
pyproject's ``[tool.setuptools] packages`` fails CI rather than the first user
who installs the wheel.

The fresh virtualenv sees the packages installed in this one through a ``.pth``
file naming a directory of symlinks to them, minus asyncflow's own editable
install: nothing is downloaded.  Nothing here imports asyncflow itself; every
check of the installed package runs in the fresh virtualenv.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.timeout(600)

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
#: what runs against the wheel: the conformance suite on threads and on
#: processes, and the engine's own tests
SUITE = ["tests/test_conformance_concurrent.py", "tests/test_engine.py"]
#: work-tree entries the build neither needs nor should see
NOT_BUILT = [".git", ".venv", "*.egg-info", "build", "dist", "bench-out"]
NOT_BUILT += ["__pycache__", ".mypy_cache", ".ruff_cache", ".pytest_cache"]

#: run in the fresh virtualenv with module names on stdin: what fails to import,
#: and where asyncflow and its entry points come from; every failure is
#: reported, not only the first
PROBE = """
import importlib, importlib.metadata as md, importlib.util, json, sys

def failure(exc):
    return f"{type(exc).__name__}: {exc}"

out = {"errors": {}, "entry_points": {}, "file": None}
for name in json.load(sys.stdin):
    try:
        if name.rpartition(".")[2] == "__main__":  # runs on import: look only
            assert importlib.util.find_spec(name) is not None, "not found"
        else:
            importlib.import_module(name)
    except BaseException as exc:
        out["errors"][name] = failure(exc)
try:
    out["file"] = importlib.import_module("asyncflow").__file__
except BaseException as exc:
    out["file_error"] = failure(exc)
dist = md.distribution("asyncflow")
out["dist"] = str(dist.locate_file(""))
for ep in dist.entry_points:
    try:
        ep.load()
        out["entry_points"][f"{ep.group}:{ep.name}"] = None
    except BaseException as exc:
        out["entry_points"][f"{ep.group}:{ep.name}"] = failure(exc)
print(json.dumps(out))
"""


@dataclass
class Installed:
    python: Path
    site: Path  # the fresh virtualenv's site-packages
    files: set[str]  # what the wheel holds
    probe: dict[str, Any]

    def env(self) -> dict[str, str]:
        return fresh_env(self.python.parent.parent)


def run(cmd: Sequence[str | Path], **kw: Any) -> str:
    """The command's stdout; a failure shows its output, not a bare exit code."""
    result = subprocess.run(
        [str(c) for c in cmd], capture_output=True, text=True, timeout=300, **kw
    )
    if result.returncode != 0:
        pytest.fail(
            f"{' '.join(map(str, cmd))} exited {result.returncode}\n"
            f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
    return result.stdout


def fresh_env(venv: Path) -> dict[str, str]:
    """This environment with ``venv`` first on PATH, and nothing that would put
    the work tree or this virtualenv back on sys.path."""
    env = dict(os.environ)
    for name in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"):
        env.pop(name, None)
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return env


def source_modules() -> dict[str, Path]:
    """Every module of the work tree, named as installed (pyproject's
    package-dir maps ``adapters/`` to ``asyncflow.adapters`` and so on), with
    its file relative to the repository."""
    modules = {}
    for package, where in PYPROJECT["tool"]["setuptools"]["package-dir"].items():
        base = ROOT / where
        for path in sorted(base.rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            parts = [package, *path.relative_to(base).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path.relative_to(ROOT)
    return modules


def build_wheel(tmp: Path) -> Path:
    """Built from a copy of the work tree: setuptools writes build/ and egg-info
    next to the sources, which do not belong in a checkout others work in."""
    src, out = tmp / "src", tmp / "wheel"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(*NOT_BUILT))
    cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--disable-pip-version-check"]
    cmd += ["--no-deps", "--no-build-isolation", "--no-index", "-w", out, src]
    result = subprocess.run(
        [str(c) for c in cmd], capture_output=True, text=True, timeout=300
    )
    if result.returncode != 0:
        pytest.fail(
            "building the wheel failed; it builds offline, so this virtualenv needs "
            "pyproject's [build-system] requires (ci/setup.sh installs them):\n"
            + result.stderr[-3000:]
        )
    (wheel,) = out.glob("asyncflow-*.whl")
    return wheel


def make_venv(tmp: Path) -> tuple[Path, Path]:
    """(python, site-packages) of a virtualenv that sees this one's packages
    except asyncflow and this repository's other editable installs."""
    venv, deps = tmp / "venv", tmp / "deps"
    run([sys.executable, "-m", "venv", "--without-pip", venv])
    python = venv / "bin" / "python"
    where = "import sysconfig; print(sysconfig.get_path('purelib'))"
    site = Path(run([python, "-c", where]).strip())
    deps.mkdir()
    for entry in Path(sysconfig.get_path("purelib")).iterdir():
        if not entry.name.lower().startswith(("asyncflow", "__editable__")):
            (deps / entry.name).symlink_to(entry)
    (site / "deps.pth").write_text(f"{deps}\n")
    return python, site


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    tmp = tmp_path_factory.mktemp("wheel")
    wheel = build_wheel(tmp)
    python, site = make_venv(tmp)
    env, cwd = fresh_env(python.parent.parent), tmp  # the repository not on sys.path
    seen = "import importlib.util as u; print(u.find_spec('asyncflow') is None)"
    assert run([python, "-c", seen], env=env, cwd=cwd).strip() == "True", (
        "the fresh virtualenv sees an asyncflow before the wheel is installed"
    )
    pip = [python, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    run([*pip, "--no-deps", "--no-index", wheel], env=env, cwd=cwd)
    (tmp / "probe.py").write_text(PROBE)
    names = json.dumps(sorted(source_modules()))
    printed = run([python, "probe.py"], env=env, cwd=cwd, input=names)
    probe = json.loads(printed.splitlines()[-1])  # after anything imports print
    with zipfile.ZipFile(wheel) as zf:
        files = set(zf.namelist())
    return Installed(python, site, files, probe)


def test_asyncflow_comes_from_the_wheel(installed: Installed) -> None:
    where = installed.probe["file"]
    assert where, installed.probe.get("file_error")
    for path in (Path(where), Path(installed.probe["dist"])):
        assert path.is_relative_to(installed.site), path
        assert not path.is_relative_to(ROOT), path


def test_every_source_package_is_in_the_wheel(installed: Installed) -> None:
    missing = [
        f"{name} ({source.parent}/)"
        for name, source in source_modules().items()
        if source.name == "__init__.py"
        and f"{name.replace('.', '/')}/__init__.py" not in installed.files
    ]
    assert not missing, (
        f"not in the wheel: {', '.join(missing)}; add each to "
        "[tool.setuptools] packages in pyproject.toml"
    )


def test_every_source_module_imports_from_the_wheel(installed: Installed) -> None:
    errors = [f"{name}: {err}" for name, err in installed.probe["errors"].items()]
    shown = errors[:15] + ([f"... and {len(errors) - 15} more"] * (len(errors) > 15))
    assert not errors, "modules failing to import from the wheel:\n" + "\n".join(shown)


def test_py_typed_ships(installed: Installed) -> None:
    assert "asyncflow/py.typed" in installed.files
    assert (installed.site / "asyncflow" / "py.typed").is_file()


def test_entry_points_resolve(installed: Installed) -> None:
    points = installed.probe["entry_points"]
    declared = PYPROJECT["project"]["entry-points"]["asyncflow.backends"]
    assert {f"asyncflow.backends:{name}" for name in declared} <= set(points)
    assert "console_scripts:asyncflow" in points
    broken = {name: err for name, err in points.items() if err}
    assert not broken, broken


def test_console_script_runs(installed: Installed, tmp_path: Path) -> None:
    script = installed.python.parent / "asyncflow"
    listing = run([script, "backends"], env=installed.env(), cwd=tmp_path)
    assert "threads" in listing and "processes" in listing


def test_suite_passes_against_the_wheel(installed: Installed, tmp_path: Path) -> None:
    """The tests are copied, with pyproject.toml for pytest's settings, to a
    directory holding no asyncflow; after the run, the asyncflow they imported
    must be the wheel's."""
    shutil.copytree(
        ROOT / "tests", tmp_path / "tests", ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    start = (
        "import sys, pytest\n"
        "code = pytest.main(sys.argv[2:])\n"
        "used = getattr(sys.modules.get('asyncflow'), '__file__', '')\n"
        "if code == 0 and not used.startswith(sys.argv[1]):\n"
        "    sys.exit(f'the tests imported asyncflow from {used}')\n"
        "sys.exit(code)\n"
    )
    cmd = [installed.python, "-c", start, installed.site, "-q", "-x", *SUITE]
    run(cmd, env=installed.env(), cwd=tmp_path)
