"""The suite runs in a sandbox of its own (see ``tests/conftest.py``)."""

from __future__ import annotations

import os
import tempfile

import pytest

pytestmark = pytest.mark.timeout(30)


def test_home_and_temp_dir_are_the_sessions_own() -> None:
    root = os.environ["ASYNCFLOW_TEST_SANDBOX"]
    assert os.path.expanduser("~").startswith(root + os.sep)
    assert tempfile.gettempdir() == root
