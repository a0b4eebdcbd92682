"""Bad input, on every backend: what a user can get wrong that only shows once
a runtime is involved.  Each case runs in a fresh interpreter
(``drivers.py``), so a runtime that falls over takes only its own case down.

* A chain 100,000 deep whose root fails: every hop fails with
  ``DependencyFailureError`` naming the root, without recursion, on every
  backend (its time is in the report, growth against a 10,000-deep chain in the
  reliability notes).
"""

from __future__ import annotations

import pytest

from .conftest import BACKENDS, require, run_driver

pytestmark = pytest.mark.timeout(300)

DEPTH = 100_000


@pytest.mark.parametrize("name", BACKENDS)
def test_a_deep_chain_failing_at_its_root(name: str) -> None:
    require(name)
    got = run_driver("failing-chain", name, str(DEPTH), timeout=240)
    assert got["root"] == "ValueError", got
    assert got["dependents_failed"] == DEPTH - 1, got
