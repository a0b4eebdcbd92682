"""pyproject.toml and the registry's table of in-tree adapters say the same.

The entry points and extras live in pyproject.toml because packaging reads them
there; everything else about an in-tree adapter lives in
:data:`asyncflow.registry.ADAPTERS`.  A backend added to one and not the other,
or an install hint naming an extra that does not exist, fails here rather than
in a user's ``pip install``.
"""

from __future__ import annotations

import importlib
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from asyncflow.bench.raw import Raw
from asyncflow.registry import ADAPTERS, BATCH

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


@pytest.fixture(scope="module")
def project() -> dict[str, Any]:
    with open(PYPROJECT, "rb") as f:
        return tomllib.load(f)["project"]


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_every_adapter_has_its_entry_point(name: str, project: dict[str, Any]) -> None:
    entry_points = project["entry-points"]["asyncflow.backends"]
    assert entry_points.get(name) == ADAPTERS[name].target


def test_every_in_tree_entry_point_is_in_the_table(project: dict[str, Any]) -> None:
    assert set(project["entry-points"]["asyncflow.backends"]) == set(ADAPTERS)


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_the_install_hint_names_an_existing_extra(
    name: str, project: dict[str, Any]
) -> None:
    adapter = ADAPTERS[name]
    if adapter.runtime is None:
        assert adapter.extra is None and adapter.install_hint == "built in"
        return
    extras = project["optional-dependencies"]
    named = re.fullmatch(r"pip install 'asyncflow\[(\w+)\]'", adapter.install_hint)
    assert named, adapter.install_hint
    assert named[1] == adapter.extra and adapter.extra in extras
    (everything,) = extras["all"]
    assert adapter.extra in re.findall(r"\w+", everything.partition("[")[2])


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_the_bench_baseline_is_a_raw_runtime(name: str) -> None:
    """A batch backend's baseline has a batch form of its own, for ``bench
    --hpc``; any other's has none."""
    adapter = ADAPTERS[name]
    module, _, attr = adapter.baseline.partition(":")
    cls = getattr(importlib.import_module(module), attr)
    assert issubclass(cls, Raw)
    own_batch_form = "for_allocation" in vars(cls)
    assert own_batch_form == adapter.batch == (name in BATCH)


def test_a_broken_adapter_is_not_reported_as_a_missing_runtime() -> None:
    """An adapter whose own code fails to import shows that error; the install
    hint is only for a third-party runtime that is absent."""
    from asyncflow.registry import _missing_runtime

    assert _missing_runtime(ModuleNotFoundError("no", name="distributed"))
    ours = ImportError("cannot import name 'X'", name="asyncflow.adapters.dask.x")
    assert not _missing_runtime(ours)
    assert not _missing_runtime(ModuleNotFoundError("no", name="asyncflow.nope"))
