"""A script in radical.asyncflow's style runs with only its imports changed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "migration" / "peer_script.py"


@pytest.mark.timeout(120)
def test_peer_style_script_runs_after_changing_its_imports(tmp_path: Path) -> None:
    source = SCRIPT.read_text()
    assert "from radical.asyncflow" in source
    moved = tmp_path / "workflow.py"
    moved.write_text(source.replace("radical.asyncflow", "asyncflow"))
    run = subprocess.run(
        [sys.executable, str(moved), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert "results ['rp 42', 'rp 42', 'rp 42']" in lines
    assert any(
        line.startswith("root cause ValueError('planned') ['fail.") for line in lines
    ), lines
    assert "failed command ExecutableFailedError" in lines
