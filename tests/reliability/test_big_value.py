"""A function returning 2 GiB, awaited in the driver and passed to a dependent.

Each backend either delivers it whole, to the dependent and to the driver, or
fails the task at once with an error that names it and says what to do: Parsl
carries a result through three processes, each holding all of it, and past
``asyncflow.adapters.parsl.worker.RESULT_LIMIT`` asyncflow refuses it rather
than let the manager, busy sending, be declared lost.
"""

from __future__ import annotations

import pytest

from .conftest import BACKENDS, require, run_driver

pytestmark = pytest.mark.timeout(900)

MIB = 2048


@pytest.mark.parametrize("name", BACKENDS)
def test_a_two_gibibyte_value(name: str) -> None:
    require(name)
    got = run_driver("big-value", name, str(MIB), timeout=840)
    if name == "parsl":
        assert "SerializationError" in got["error"], got
        assert "'make_bytes'" in got["error"] and "OutputFile" in got["error"], got
        return
    assert got.get("dependent_saw") == got.get("driver_got") == MIB * 2**20, got
