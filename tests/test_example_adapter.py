"""An out-of-tree adapter, installed with its own entry point, passes the suite.

``tests/example_adapter`` is the README's "Write your own adapter" walk-through.
"""

from __future__ import annotations

import pytest

from asyncflow import available_backends, load_backend
from asyncflow.conformance import BackendFixtures, ConformanceSuite


class TestExampleAdapter(BackendFixtures, ConformanceSuite):
    @pytest.fixture
    def backend(self):  # type: ignore[no-untyped-def]
        return load_backend("asyncio-example", max_workers=2)


def test_found_through_its_entry_point() -> None:
    names = {s.name: s for s in available_backends()}
    assert names["asyncio-example"].installed
    assert names["asyncio-example"].target == "asyncflow_example:AsyncioBackend"
