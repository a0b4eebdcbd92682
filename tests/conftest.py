"""Suite-wide setup: everything the tests start keeps its files in one temp dir.

Runtimes write wherever ``$HOME`` and ``$TMPDIR`` point (radical.pilot's
sandboxes and ``~/.radical``, Ray's ``~/.ray``, PSI/J's ``~/.psij``, Dask's
``dask-scratch-space``, multiprocessing's ``pymp-*``).  The session points both
at a directory of its own, removed at the end, and fails if any of those names
still appeared in the user's real home or the shared temp dir meanwhile.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
import tempfile
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

#: what the runtimes the suite starts leave behind, by name
HOME_LEAKS = (".radical", ".ray", ".psij", ".parsl", "radical.pilot.sandbox")
TMP_LEAKS = (
    "dask-scratch-space",
    "pymp-*",
    "ray",
    "asyncflow-*",
    "pytest-of-*",
    "rp.session.*",
)


class _Sandbox:
    def __init__(self) -> None:
        self.home = Path(os.environ.get("HOME") or Path.home())
        self.tmp = Path(tempfile.gettempdir())
        # short: Ray's unix sockets live below $TMPDIR (a 107-byte limit)
        self.root = Path(tempfile.mkdtemp(prefix="af-", dir=self.tmp))
        self.before = self._snapshot()

    def enter(self) -> None:
        (self.root / "home").mkdir()
        os.environ["HOME"] = str(self.root / "home")
        os.environ["TMPDIR"] = str(self.root)
        tempfile.tempdir = None  # gettempdir() reads $TMPDIR again

    def _snapshot(self) -> set[str]:
        found = set()
        for where, patterns in ((self.home, HOME_LEAKS), (self.tmp, TMP_LEAKS)):
            try:
                names = os.listdir(where)
            except OSError:
                continue
            found |= {
                str(where / n)
                for n in names
                if any(fnmatch.fnmatch(n, p) for p in patterns)
            }
        return found

    def leaks(self) -> list[str]:
        return sorted(self._snapshot() - self.before)

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


_sandbox: _Sandbox | None = None


def pytest_configure(config: pytest.Config) -> None:
    global _sandbox
    if _sandbox is None and not os.environ.get("ASYNCFLOW_TEST_SANDBOX"):
        _sandbox = _Sandbox()
        _sandbox.enter()
        os.environ["ASYNCFLOW_TEST_SANDBOX"] = str(_sandbox.root)  # nested runs


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _sandbox is None:
        return
    leaks = _sandbox.leaks()
    _sandbox.remove()
    if leaks:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(
                "files written outside the test session's temp dir: "
                + ", ".join(leaks),
                red=True,
            )
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
