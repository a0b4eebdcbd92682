"""The shape the codebase keeps: measured on the source, so that it holds.

Each rule is one the project chose on purpose (see the house style in the
README's contributing notes): functions short enough to read at once, modules
with one job, adapters composed of collaborators rather than mixins, and
modules that talk through public names rather than each other's private ones.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("asyncflow", "adapters", "conformance")
MAX_FUNCTION_LINES = 60
MAX_MODULE_LINES = 420
#: names a module may import from a sibling although they start with "_":
#: the package's private helpers module, shared on purpose
SHARED_PRIVATE_MODULES = {"_util", "_awaitable", "_pipes", "_pool", "_rp"}


def _sources() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def _trees() -> list[tuple[Path, ast.Module]]:
    return [(p, ast.parse(p.read_text(), str(p))) for p in _sources()]


def test_no_function_over_sixty_lines() -> None:
    long = [
        f"{p.relative_to(ROOT)}:{node.lineno} {node.name} "
        f"({node.end_lineno - node.lineno + 1} lines)"
        for p, tree in _trees()
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno is not None
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, "split these by job:\n" + "\n".join(long)


def test_modules_have_one_job_and_stay_readable() -> None:
    big = [
        f"{p.relative_to(ROOT)} ({n} lines)"
        for p in _sources()
        if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES
    ]
    assert not big, "split these by job:\n" + "\n".join(big)


def test_adapters_compose_collaborators_instead_of_mixins() -> None:
    mixins = [
        f"{p.relative_to(ROOT)}:{node.lineno} {node.name}"
        for p, tree in _trees()
        for node in ast.walk(tree)
        if isinstance(node, ast.ClassDef) and node.name.endswith("Mixin")
    ]
    assert not mixins, "\n".join(mixins)


def test_modules_import_public_names_from_each_other() -> None:
    private = [
        f"{p.relative_to(ROOT)}:{node.lineno} {alias.name} from {node.module}"
        for p, tree in _trees()
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
        if alias.name.startswith("_")
        and not alias.name.startswith("__")
        and (node.module or "").rpartition(".")[2] not in SHARED_PRIVATE_MODULES
    ]
    assert len(private) < 20, (
        f"{len(private)} imports of another module's private names; make the "
        "name public where it is shared:\n" + "\n".join(private)
    )
